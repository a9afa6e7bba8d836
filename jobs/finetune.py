"""Fine-tune the GeoReasoner VLM: base (local stand-in pretraining), reasoning (stage 1) or location (stage 2),
on Ray Train + DeepSpeed ZeRO with LoRA."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeasoner.core.runner import entrypoint  # noqa: E402
from georeasoner.vlm.finetune import JOB, FinetuneConfig, run  # noqa: E402

if __name__ == "__main__":
    entrypoint(JOB, FinetuneConfig, run, doc=__doc__)
