"""VLMs of the Qwen2-VL and Qwen2.5-VL families through one loader, and the VLM model package.

A model reference is one of:

- ``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl``: a tiny config with random weights (seeded) and a byte-level BPE
  tokenizer trained in-process, where every country name is one token (local runs and tests: no hub);
- a VLM package (folder or ``s3://`` with ``model_card.json``, ``kind: vlm``);
- a transformers checkpoint: a local folder, an ``s3://`` folder (copied once into the cache) or a hub id.

A VLM package holds ``model_card.json``, the processor (``processor/``), optionally full base weights
(``base/``: the ``base`` stage, or a random tiny base) and LoRA adapters (``adapters/<name>/``, peft format,
safetensors), applied in the card's order on top of the base. The card's ``base`` names what the weights start
from (``{"ref": <reference or null>, "path": "base" or null}``). Loading merges every adapter; training
loads with the last adapter kept trainable where asked. Nothing is unpickled and ``trust_remote_code`` is off.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from georeasoner.core import packages, storage

KIND = "vlm"
TINY_PREFIX = "tiny:"
FAMILIES = ("qwen2-vl", "qwen2.5-vl")
TINY_IMAGE_SIZE = 168  # a multiple of 28: 144 patches -> 36 image tokens (plates and scripts stay legible)
# The tiny models' sizes: text hidden/layers, vision width/depth (a few million parameters train in minutes on 2 cores)
TINY_TEXT_HIDDEN, TINY_TEXT_LAYERS = 128, 2
TINY_VISION_DIM, TINY_VISION_DEPTH = 64, 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
PAD, EOS = "<|endoftext|>", "<|im_end|>"


@dataclass
class LoadedVLM:
    """A model ready for inference or training, with the processor and where it came from."""

    model: Any
    processor: Any
    family: str
    version: str
    card: dict[str, Any] = field(default_factory=dict)
    # where a package trained on this model gets its base: {"ref": reference} | {"copy": local folder of
    # full weights} | {"tiny": ref, "seed": n} (random weights: saved into the new package)
    base: dict[str, Any] = field(default_factory=dict)
    adapters: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "dir"}] already merged in the model
    clue_head: Any = None  # the package's clue head (georeasoner.vlm.perception.ClueHead), when it has one

    @property
    def tokenizer(self):
        return self.processor.tokenizer


# -- tiny models ------------------------------------------------------------------------------

def is_tiny(ref: str) -> bool:
    return ref.startswith(TINY_PREFIX)


def _tiny_parts(ref: str) -> tuple[str, str | None]:
    family, _, size = ref[len(TINY_PREFIX):].partition(":")
    return family, size or None


def tiny_family(ref: str) -> str:
    family, _ = _tiny_parts(ref)
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model '{ref}' (tiny:qwen2-vl or tiny:qwen2.5-vl, optionally sized as "
                         "tiny:qwen2-vl:256x2: text hidden x layers)")
    tiny_size(ref)
    return family


def tiny_size(ref: str) -> tuple[int, int]:
    """(text hidden, text layers) of a tiny reference: ``tiny:<family>`` is 128x2; ``tiny:<family>:<hidden>x<layers>``
    sizes the language side (hidden a multiple of 64: 32-d heads, grouped key/values)."""
    _, size = _tiny_parts(ref)
    if size is None:
        return TINY_TEXT_HIDDEN, TINY_TEXT_LAYERS
    hidden, _, layers = size.partition("x")
    if not (hidden.isdigit() and layers.isdigit() and int(hidden) % 64 == 0 and 64 <= int(hidden) <= 4096
            and 1 <= int(layers) <= 64):
        raise ValueError(f"tiny model '{ref}': the size must be <hidden>x<layers>, hidden a multiple of 64 "
                         "(64..4096), layers 1..64, e.g. tiny:qwen2-vl:256x2")
    return int(hidden), int(layers)


def _tokenizer_corpus() -> list[str]:
    """Texts the tiny BPE is trained on: prompts, JSON answers, clue tips, city names."""
    from georeasoner.vlm import prompts
    from georeasoner.geo import country_name
    from georeasoner.world import clues, facts

    texts = list(prompts.PROMPTS.values()) + [prompts.SYSTEM, "user", "assistant", "system",
                                              prompts.NEAR_INTRO, prompts.FAR_INTRO]
    texts += [json.dumps({"reasons": "z", "country": "x", "city": "y"}), "null", "0123456789 .,;:!?'\"()[]{}-"]
    for style in facts.COUNTRIES:
        for city in style.cities:
            texts.append(prompts.location_answer(country_name(style.iso2) or style.iso2, city.name, prompts.NO_CLUES))
    for entry in clues.catalogue():
        texts.append(entry["text"])
        texts.append(prompts.clue_phrase(entry["clue"]))
    return texts * 3


def country_names() -> list[str]:
    """Every country name the geography knows (each one token in the tiny tokenizer)."""
    from georeasoner.geo import country_codes, country_name

    return sorted({n for n in (country_name(c) for c in country_codes()) if n})


@lru_cache(maxsize=1)
def _tiny_tokenizer_file() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    tok.add_tokens([AddedToken(name, normalized=False) for name in country_names()])
    folder = Path(tempfile.mkdtemp(prefix="georeasoner-tok-"))
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def build_processor(family: str, image_size: int = TINY_IMAGE_SIZE):
    """The tiny tokenizer wrapped as a Qwen2 tokenizer, with the family's processor at a fixed image size."""
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = Qwen2TokenizerFast(tokenizer_file=_tiny_tokenizer_file(), unk_token=None, bos_token=None,
                                   eos_token=EOS, pad_token=PAD)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLProcessor as Processor
    return Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def tiny_config(family: str, tokenizer, hidden: int = TINY_TEXT_HIDDEN, layers: int = TINY_TEXT_LAYERS,
                vision_dim: int = TINY_VISION_DIM, vision_depth: int = TINY_VISION_DEPTH):
    """A tiny Qwen2-VL / Qwen2.5-VL config (head_dim 32: mrope_section sums to 16)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64), max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    if family == "qwen2.5-vl":
        vision = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden, intermediate_size=2 * vision_dim,
                      num_heads=max(1, vision_dim // 32), patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      in_chans=3, window_size=56, fullatt_block_indexes=[vision_depth - 1])
        cls = Qwen2_5_VLConfig
    else:
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=max(1, vision_dim // 32),
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
        cls = Qwen2VLConfig
    cfg = cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
              vision_end_token_id=ids["<|vision_end|>"], bos_token_id=None, eos_token_id=ids[EOS],
              pad_token_id=ids[PAD], tie_word_embeddings=False)
    return cfg


def build_tiny(ref: str, seed: int = 0):
    """(model, processor) of a tiny random model; the same seed gives the same weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    family = tiny_family(ref)
    processor = build_processor(family)
    torch.manual_seed(seed)
    hidden, layers = tiny_size(ref)
    model = AutoModelForImageTextToText.from_config(tiny_config(family, processor.tokenizer, hidden, layers))
    _set_generation_ids(model, processor.tokenizer)
    return model, processor


def _set_generation_ids(model, tokenizer) -> None:
    gen = model.generation_config
    gen.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    gen.pad_token_id = tokenizer.convert_tokens_to_ids(PAD)
    gen.bos_token_id = None


# -- references --------------------------------------------------------------------------------

def family_of(config) -> str:
    kind = getattr(config, "model_type", "")
    if kind == "qwen2_5_vl":
        return "qwen2.5-vl"
    if kind == "qwen2_vl":
        return "qwen2-vl"
    raise ValueError(f"model type '{kind}' is not a Qwen2-VL or Qwen2.5-VL model")


def is_package(ref: str) -> bool:
    if is_tiny(ref):
        return False
    try:
        card_uri = storage.join(ref, packages.CARD)
        return storage.is_file(card_uri) and storage.read_json(card_uri).get("kind") == KIND
    except (OSError, ValueError):
        return False


def _is_checkpoint_dir(ref: str) -> bool:
    return storage.is_file(storage.join(ref, "config.json"))


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~")) and "://" not in ref


def check_reference(ref: str) -> None:
    """ValueError naming ``ref`` unless it can be loaded (hub ids are accepted as they are)."""
    if is_tiny(ref):
        tiny_family(ref)
    elif is_package(ref) or _is_checkpoint_dir(ref):
        return
    elif storage.is_s3(ref) or Path(ref).expanduser().exists() or not looks_like_hub_id(ref):
        raise ValueError(f"model '{ref}' is neither a VLM package, a transformers checkpoint folder, "
                         "a hub id nor tiny:qwen2-vl / tiny:qwen2.5-vl")


def local_checkpoint(ref: str) -> str:
    """A local folder or hub id for ``from_pretrained``: s3:// checkpoints are copied once into the cache."""
    if not storage.is_s3(ref):
        path = Path(ref).expanduser()
        return str(path.resolve()) if path.exists() else ref
    entries = sorted(storage.iter_files(ref, include_hidden=False), key=lambda e: e.uri)
    ident = json.dumps([(e.uri, e.size) for e in entries])
    dest = packages.cache_root() / "checkpoints" / hashlib.sha256(f"{ref}|{ident}".encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return str(dest)
    return str(packages.copy_into_cache(ref, entries, dest))


def _torch_dtype(dtype: str | None):
    import torch

    return {None: None, "auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]


def _from_pretrained(path: str, dtype: str | None, with_processor: bool = True):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype:
        kwargs["dtype"] = _torch_dtype(dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True, **kwargs)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False) if with_processor else None
    return model, processor


def load_vlm(ref: str, *, dtype: str | None = None, device: str | None = None, seed: int = 0,
             merge: bool = True) -> LoadedVLM:
    """Load any model reference (see the module doc) with every adapter merged in (``merge=False`` keeps the
    last adapter as a peft model, e.g. to check an adapter's logits)."""
    if is_tiny(ref):
        model, processor = build_tiny(ref, seed)
        loaded = LoadedVLM(model, processor, tiny_family(ref), f"{ref}@seed{seed}",
                           base={"tiny": ref, "seed": seed})
    elif is_package(ref):
        loaded = _load_package(ref, dtype, merge)
    else:
        check_reference(ref)
        model, processor = _from_pretrained(local_checkpoint(ref), dtype)
        loaded = LoadedVLM(model, processor, family_of(model.config), ref, base={"ref": ref})
    if device:
        loaded.model.to(device)
    loaded.model.eval()
    return loaded


def load_processor(ref: str):
    """The processor :func:`load_vlm` would return for ``ref``, without loading any weights."""
    from transformers import AutoProcessor

    if is_tiny(ref):
        return build_processor(tiny_family(ref))
    if is_package(ref):
        folder = packages.local_copy(ref)
        card = json.loads((folder / packages.CARD).read_text())
        return AutoProcessor.from_pretrained(str(folder / card.get("processor", "processor")), trust_remote_code=False)
    check_reference(ref)
    return AutoProcessor.from_pretrained(local_checkpoint(ref), trust_remote_code=False)


def _load_package(uri: str, dtype: str | None, merge: bool) -> LoadedVLM:
    from transformers import AutoProcessor

    folder = packages.local_copy(uri)
    card = json.loads((folder / packages.CARD).read_text())
    base = card.get("base") or {}
    if base.get("path"):
        model, _ = _from_pretrained(str(folder / base["path"]), dtype, with_processor=False)
    elif base.get("ref"):
        model = load_vlm(base["ref"], dtype=dtype).model
    else:
        raise ValueError(f"VLM package '{uri}' names no base (card 'base' has neither 'path' nor 'ref')")
    adapters = [{"name": a["name"], "dir": str(folder / a["path"])} for a in card.get("adapters", [])]
    model = apply_adapters(model, adapters, merge_last=merge)
    processor = AutoProcessor.from_pretrained(str(folder / card.get("processor", "processor")), trust_remote_code=False)
    if card.get("adapters") and base.get("path"):
        lineage = {"copy": str(folder / base["path"])}  # children copy the base weights
    elif card.get("adapters"):
        lineage = {"ref": base["ref"]}
    else:
        lineage = {"ref": storage.absolute(uri)}  # a full-weights package (the base stage): referenced
    head = None
    if card.get("clue_head"):
        from georeasoner.vlm.perception import ClueHead

        head = ClueHead.load(folder)
        if head is None:
            raise ValueError(f"VLM package '{uri}': its card names a clue head but '{card['clue_head'].get('path')}/' "
                             "is incomplete")
    return LoadedVLM(model, processor, card.get("family") or family_of(model.config), card["version"], card,
                     base=lineage, adapters=adapters, clue_head=head)


def apply_adapters(model, adapters: list[dict[str, Any]], merge_last: bool = True, trainable_last: bool = False):
    """Apply peft adapters in order, merging each into the weights (the last one only when ``merge_last``)."""
    from peft import PeftModel

    for i, adapter in enumerate(adapters):
        last = i == len(adapters) - 1
        peft_model = PeftModel.from_pretrained(model, adapter["dir"], is_trainable=last and trainable_last)
        model = peft_model if (last and not merge_last) else peft_model.merge_and_unload()
    return model


def vision_tower(model):
    """The vision tower of a Qwen2-VL / Qwen2.5-VL model (``model.visual`` or ``model.model.visual``)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if tower is None:
        raise ValueError("the model has no vision tower ('visual')")
    return tower


# -- packages -----------------------------------------------------------------------------------

def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(packages.digest_file(path).encode())
    return h.hexdigest()


def write_package(folder: Path, output: str, *, name: str, family: str, base: dict[str, Any],
                  adapters: list[dict[str, Any]], stages: list[str], training_data: list[dict[str, Any]],
                  metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finish a package assembled in the local ``folder`` (``processor/``, ``base/`` and/or ``adapters/`` already
    there): write the card and copy it to ``output`` (local or s3://). Returns the card."""
    digest = hashlib.sha256((weights_digest(folder) + json.dumps(base, sort_keys=True)).encode()).hexdigest()
    card = packages.make_card(name, digest, base_model=base.get("ref") or base.get("origin"),
                              stages=stages, training_data=training_data, metrics=metrics,
                              extra={"kind": KIND, "family": family, "base": base, "adapters": adapters,
                                     "processor": "processor", **(extra or {})})
    packages.write_json(folder / packages.CARD, card)
    packages.upload_folder(folder, storage.absolute(output) if not storage.is_s3(output) else output)
    return card


def save_processor(processor, folder: Path) -> None:
    processor.save_pretrained(str(folder / "processor"))


def export_merged(ref: str, output: str, dtype: str | None = None) -> str:
    """``export``: the merged model (base + every adapter) as a plain transformers checkpoint for other engines."""
    loaded = load_vlm(ref, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.processor.save_pretrained(tmp)
        packages.upload_folder(tmp, storage.absolute(output) if not storage.is_s3(output) else output)
    return output


def write_untrained_package(ref: str, output: str, seed: int = 0, name: str = "georeasoner-vlm-untrained") -> dict:
    """A package of an untrained tiny model (weights in ``base/``, no adapters): for tests and smoke runs."""
    loaded = load_vlm(ref, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        loaded.model.save_pretrained(str(folder / "base"), safe_serialization=True)
        loaded.processor.save_pretrained(str(folder / "base"))
        save_processor(loaded.processor, folder)
        return write_package(folder, output, name=name, family=loaded.family,
                             base={"ref": None, "path": "base", "origin": ref}, adapters=[],
                             stages=[{"task": "untrained", "seed": seed}], training_data=[])
