"""The clue head: a multi-label clue classifier on the VLM's own vision tower, kept in the package, that audits the
reasons the language model writes.

Why: the language side of a small VLM reads less of the image than its tower holds (README › Reasons: a linear
readout of the tower's image tokens finds the clues at F1 ≈ 0.75, the descriptions at ≈ 0.5), and about half of
the clues its reasons cite are not in the image. The head is a linear map of the tower's merged image tokens
(flattened) to one logit per clue, fitted on rows that carry ``clues`` with the tower frozen
(:func:`fit_clue_head`). At inference (:class:`georeasoner.vlm.predict.Geolocator`) every sentence of the generated
reasons is matched to a clue (the grounding matcher over the clues' observation sentences, docs/metrics.md ›
Grounding); a sentence whose clue the head scores below its threshold is dropped, and the model writes the country
and city again after the audited reasons (the answer stays conditioned on what it says it sees). The language model
writes every word of the reasons; the head only removes sentences. Sentences that cite no known clue are kept.

Clue evidence for the country: fitted on rows that also carry a ``country``, the head keeps how often each clue is
seen in each country's training images (``theta`` [V, C], add-one smoothed) and the countries' shares. For an image
it scores each country by the Bernoulli log-likelihood of what the head sees, its probabilities taken as soft
evidence: ``log q(c) = log prior(c) + sum_v [p_v log theta_vc + (1 - p_v) log(1 - theta_vc)] / T``, with ``T`` (a
temperature: the clues are not independent) picked by the held-out rows' country log-loss. The Geolocator adds
``clue_weight`` · log q to the language model's own distribution over the country it writes (a product of
experts): the country follows from the clues the tower sees. The same frequencies per (country, city) — the
landmarks of a skyline tell cities apart — weigh the model's first city token among that country's training cities.

Package layout (``docs/schemas.md`` › VLM package): ``perception/clue_head.safetensors`` (``weight`` [V, F],
``bias`` [V], ``mean``/``scale`` [F]: the feature standardisation) and ``perception/clue_head.json``
(``clues``: the V clue ids in logit order, ``texts``: their observation sentences, ``threshold``, ``features``,
``holdout``: precision/recall of the head on held-out training rows; with clue evidence also ``theta`` [V, C],
``log_prior`` [C] and ``city_theta`` [V, K] in the weights, ``countries`` (ISO2, column order), ``cities``
([ISO2, name] per column) and ``temperature`` in the JSON). A LoRA stage with a frozen tower carries the head of
its start package forward; a stage that trains the tower drops it (or fits a new one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HEAD_DIR = "perception"
WEIGHTS = "clue_head.safetensors"
META = "clue_head.json"
# up to 0.99: a head fitted on a few thousand rows is confident, and precision keeps rising above 0.9
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.3, 0.951, 0.05)) + (0.97, 0.98, 0.99)


def image_features(model, pixel_values, grid_thw):
    """[N, tokens·width] float32: the vision tower's merged image tokens of each image, flattened (all images of
    the batch must have the same grid, as the tiny models' fixed-size processor gives)."""
    import torch

    from georeasoner.vlm.model import vision_tower

    tower = vision_tower(model)
    n = int(grid_thw.shape[0])
    dtype = next(tower.parameters()).dtype
    with torch.no_grad():
        out = tower(pixel_values.to(dtype), grid_thw=grid_thw).pooler_output
    return out.float().reshape(n, -1)


def _split_sentences(text: str) -> list[str]:
    from georeasoner.metrics.grounding import _SENTENCES

    return [s for s in _SENTENCES.findall(text or "") if s.strip()]


@dataclass
class ClueHead:
    """A fitted clue head (see the module doc)."""

    weight: Any  # torch [V, F]
    bias: Any  # torch [V]
    mean: Any  # torch [F]
    scale: Any  # torch [F]
    clues: list[str]
    texts: list[str]
    threshold: float
    meta: dict[str, Any]
    evidence: "CountryEvidence | None" = None

    def __post_init__(self):
        from georeasoner.metrics.grounding import ClueCatalogue

        self.index = {c: i for i, c in enumerate(self.clues)}
        self.catalogue = ClueCatalogue.from_records([{"clue": c, "text": t} for c, t in zip(self.clues, self.texts)])

    # -- inference ----------------------------------------------------------------------------
    def probabilities_of(self, features) -> np.ndarray:
        """[N, V] clue probabilities from :func:`image_features`."""
        import torch

        x = (features.float() - self.mean) / self.scale
        return torch.sigmoid(x @ self.weight.T + self.bias).cpu().numpy()

    def probabilities(self, model, pixel_values, grid_thw) -> np.ndarray:
        device = next(model.parameters()).device
        feats = image_features(model, pixel_values.to(device), grid_thw.to(device)).cpu()
        return self.probabilities_of(feats)

    def country_evidence(self, probs: np.ndarray) -> dict[str, float] | None:
        """ISO2 → log q(country | what the head sees in one image) (module doc), or None without evidence."""
        if self.evidence is None:
            return None
        return dict(zip(self.evidence.countries, self.evidence.logq(probs[None, :])[0].tolist()))

    def seen(self, probs: np.ndarray) -> list[str]:
        """The clues one image's probabilities put at or above the threshold."""
        return [c for c, p in zip(self.clues, probs) if p >= self.threshold]

    def audit(self, reasons: str, probs: np.ndarray) -> tuple[str, list[str]]:
        """(``reasons`` without the sentences whose clue the head does not see, the dropped clue ids). The kept
        sentences are the model's own, in order; when every sentence is dropped the text is empty."""
        kept, dropped = [], []
        for sentence in _split_sentences(reasons):
            clue = self.catalogue.match_sentence(sentence)
            if clue is not None and clue in self.index and probs[self.index[clue]] < self.threshold:
                dropped.append(clue)
                continue
            kept.append(sentence.strip())
        if not dropped:
            return reasons, []
        return " ".join(s if s.endswith((".", "!", "?")) else s + "." for s in kept), dropped

    # -- storage ------------------------------------------------------------------------------
    def save(self, folder: Path) -> dict[str, Any]:
        """Write ``folder/perception/``; returns the card entry."""
        from safetensors.torch import save_file

        out = Path(folder) / HEAD_DIR
        out.mkdir(parents=True, exist_ok=True)
        import torch

        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous(), "mean": self.mean.contiguous(),
                   "scale": self.scale.contiguous()}
        meta = {**self.meta, "clues": self.clues, "texts": self.texts, "threshold": self.threshold}
        if self.evidence is not None:
            tensors |= {"theta": torch.from_numpy(self.evidence.theta).float().contiguous(),
                        "log_prior": torch.from_numpy(self.evidence.log_prior).float().contiguous()}
            meta |= {"countries": self.evidence.countries, "temperature": self.evidence.temperature}
            if self.evidence.cities is not None:
                tensors["city_theta"] = torch.from_numpy(self.evidence.city_theta).float().contiguous()
                meta["cities"] = [list(p) for p in self.evidence.cities]
        save_file(tensors, str(out / WEIGHTS))
        (out / META).write_text(json.dumps(meta, indent=1))
        return {"path": HEAD_DIR, "clues": len(self.clues), "threshold": self.threshold,
                "holdout": self.meta.get("holdout"),
                **({"evidence": {"countries": len(self.evidence.countries), "temperature": self.evidence.temperature,
                                 "holdout": self.meta.get("holdout_evidence")}} if self.evidence is not None else {})}

    @classmethod
    def load(cls, folder: Path) -> "ClueHead | None":
        """The head saved under ``folder/perception``, or None."""
        from safetensors.torch import load_file

        path = Path(folder) / HEAD_DIR
        if not (path / WEIGHTS).is_file() or not (path / META).is_file():
            return None
        t = load_file(str(path / WEIGHTS))
        meta = json.loads((path / META).read_text())
        clues, texts, threshold = meta.pop("clues"), meta.pop("texts"), float(meta.pop("threshold"))
        if t["weight"].shape[0] != len(clues):
            raise ValueError(f"clue head in '{path}': {t['weight'].shape[0]} logits for {len(clues)} clues")
        evidence = None
        if "theta" in t and meta.get("countries"):
            countries = list(meta.pop("countries"))
            theta, log_prior = t["theta"].double().numpy(), t["log_prior"].double().numpy()
            if theta.shape != (len(clues), len(countries)) or log_prior.shape != (len(countries),):
                raise ValueError(f"clue head in '{path}': clue evidence of shape {tuple(theta.shape)} for "
                                 f"{len(clues)} clues and {len(countries)} countries")
            evidence = CountryEvidence(countries, theta, log_prior, float(meta.pop("temperature", 1.0)))
            places = meta.pop("cities", None)
            if places and "city_theta" in t:
                if t["city_theta"].shape != (len(clues), len(places)):
                    raise ValueError(f"clue head in '{path}': city evidence of shape {tuple(t['city_theta'].shape)} "
                                     f"for {len(clues)} clues and {len(places)} cities")
                evidence.cities = [(str(c), str(n)) for c, n in places]
                evidence.city_theta = t["city_theta"].double().numpy()
        return cls(t["weight"].float(), t["bias"].float(), t["mean"].float(), t["scale"].float(), clues, texts,
                   threshold, meta, evidence)


TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


@dataclass
class CountryEvidence:
    """Clue frequencies per country (module doc): ``theta`` [V, C] = P(clue seen | country), ``log_prior`` [C]."""

    countries: list[str]
    theta: np.ndarray
    log_prior: np.ndarray
    temperature: float = 1.0
    cities: list[tuple[str, str]] | None = None  # (ISO2, city) of each column of city_theta
    city_theta: np.ndarray | None = None  # [V, K] P(clue seen | city): landmarks tell the cities of a country apart

    @classmethod
    def fit(cls, y: np.ndarray, countries: list[str], temperature: float = 1.0,
            cities: list[str | None] | None = None) -> "CountryEvidence":
        """From ``y`` [N, V] (the rows' clue indicators) and each row's ISO2 ``countries`` (add-one smoothing); with
        each row's city name (None where unknown), the same per (country, city)."""
        codes = sorted(set(countries))
        col = np.array([codes.index(c) for c in countries])
        counts = np.bincount(col, minlength=len(codes)).astype(np.float64)
        theta = np.stack([(y[col == k].sum(0) + 1.0) / (counts[k] + 2.0) for k in range(len(codes))], 1)
        out = cls(codes, theta, np.log(counts / counts.sum()), temperature)
        if cities is not None:
            pairs = [(c, n) if isinstance(n, str) and n else None for c, n in zip(countries, cities)]
            places = sorted({p for p in pairs if p is not None})
            if places:
                out.cities = places
                out.city_theta = np.stack([(y[[p == q for p in pairs]].sum(0) + 1.0)
                                           / (sum(p == q for p in pairs) + 2.0) for q in places], 1)
        return out

    def logq(self, probs: np.ndarray) -> np.ndarray:
        """[N, C] normalised log q(country) from [N, V] clue probabilities (soft evidence)."""
        p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
        s = (p @ np.log(self.theta) + (1.0 - p) @ np.log1p(-self.theta)) / self.temperature + self.log_prior
        return s - np.logaddexp.reduce(s, axis=1, keepdims=True)

    def city_logq(self, probs: np.ndarray, country: str) -> dict[str, float]:
        """City name → normalised log q(city | country, one image's clue probabilities) over the training cities
        of ``country`` (empty when it has none)."""
        if self.cities is None:
            return {}
        cols = [k for k, (c, _) in enumerate(self.cities) if c == country]
        if not cols:
            return {}
        p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
        th = self.city_theta[:, cols]
        s = (p @ np.log(th) + (1.0 - p) @ np.log1p(-th)) / self.temperature
        s = s - np.logaddexp.reduce(s)
        return {self.cities[k][1]: float(v) for k, v in zip(cols, s)}


def _fit_evidence(y: np.ndarray, countries: list[str | None], hold: np.ndarray, train: np.ndarray,
                  held_probs: np.ndarray | None, cities: list[str | None] | None = None,
                  ) -> tuple[CountryEvidence | None, dict[str, Any] | None]:
    """The clue evidence on the rows with a country; its temperature (and held-out accuracy) from the held-out rows
    scored by the head fitted without them."""
    known = np.array([isinstance(c, str) and bool(c) for c in countries])
    if len(set(c for c, k in zip(countries, known) if k)) < 2:
        return None, None
    temperature, report = 1.0, None
    rows_hold = [i for i, r in enumerate(hold) if known[r]]
    train_known = [r for r in train if known[r]]
    if held_probs is not None and rows_hold and len({countries[r] for r in train_known}) >= 2:
        ev = CountryEvidence.fit(y[train_known], [countries[r] for r in train_known])
        truth = [countries[hold[i]] for i in rows_hold]
        seen = [i for i, c in enumerate(truth) if c in ev.countries]
        if seen:
            col = np.array([ev.countries.index(truth[i]) for i in seen])
            probs = held_probs[[rows_hold[i] for i in seen]]
            loss = {}
            for t in TEMPERATURES:
                ev.temperature = t
                q = ev.logq(probs)
                loss[t] = float(-q[np.arange(len(col)), col].mean())
            temperature = min(TEMPERATURES, key=lambda t: loss[t])
            ev.temperature = temperature
            acc = float((ev.logq(probs).argmax(1) == col).mean())
            report = {"rows": len(seen), "temperature": temperature, "country_accuracy": round(acc, 4),
                      "log_loss": round(loss[temperature], 4)}
    all_known = np.flatnonzero(known)
    return CountryEvidence.fit(y[all_known], [countries[r] for r in all_known], temperature,
                               None if cities is None else [cities[r] for r in all_known]), report


def _scores(probs: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    guess = probs >= threshold
    tp = float((guess & truth).sum())
    p = tp / max(1.0, float(guess.sum()))
    r = tp / max(1.0, float(truth.sum()))
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def _train_linear(x, y, *, steps: int, lr: float, weight_decay: float, seed: int, init=None):
    """A full-batch logistic-regression head; ``init``: a head to continue from (its weights are copied)."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():  # start at each clue's base rate: most clues are absent from most images
        if init is not None:
            head.load_state_dict(init.state_dict())
        else:
            rate = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
            head.bias.copy_(torch.log(rate / (1 - rate)))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head


def fit_clue_head(features, labels: list[list[str]], texts: dict[str, str], *, seed: int = 0, steps: int = 300,
                  lr: float = 1e-4, weight_decay: float = 0.05, holdout: float = 0.15,
                  beta: float = 2.0, countries: list[str | None] | None = None,
                  cities: list[str | None] | None = None) -> ClueHead:
    """Fit the head on ``features`` [N, F] (torch, :func:`image_features`) and each row's clue ids. A seeded
    ``holdout`` share of the rows picks the threshold (the best F-beta; ``beta`` 2 weighs recall: a sentence stays
    only when the language model wrote it *and* the head sees its clue, so the reasons' precision is well above the
    head's own — on the demo world's val split a threshold of 0.4 gave reasons precision 0.87 where the head alone
    has 0.61 — and the head's misses are what the reasons lose) and reports the head's precision/recall; the head
    starts at each clue's base rate (its bias), and the held-out fit then continues on every row for a third of
    its steps. ``texts``: clue id → observation sentence (clues without one are left out). ``countries``: each
    row's ISO2 (None where unknown): the head also keeps the clue evidence for the country (module doc), and with
    ``cities`` (each row's city name) for the city within a country."""
    import torch

    vocab = sorted({c for row in labels for c in row if c in texts})
    if not vocab:
        raise ValueError("no row carries a clue with an observation sentence: nothing to fit a clue head on")
    index = {c: i for i, c in enumerate(vocab)}
    y = np.zeros((len(labels), len(vocab)), dtype=np.float32)
    for i, row in enumerate(labels):
        for c in row:
            if c in index:
                y[i, index[c]] = 1.0
    x = features.float()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-4)
    x = (x - mean) / scale
    yt = torch.from_numpy(y)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_hold = int(round(holdout * len(labels))) if len(labels) >= 20 else 0
    hold, train = order[:n_hold], order[n_hold:]
    threshold, held, probs, start = 0.5, None, None, None
    if n_hold:
        head = start = _train_linear(x[train], yt[train], steps=steps, lr=lr, weight_decay=weight_decay, seed=seed)
        with torch.no_grad():
            probs = torch.sigmoid(head(x[hold])).numpy()
        truth = y[hold] > 0

        def fbeta(s):
            p, r = s["precision"], s["recall"]
            return (1 + beta ** 2) * p * r / (beta ** 2 * p + r) if p + r else 0.0

        scored = {t: _scores(probs, truth, t) for t in THRESHOLDS}
        threshold = max(THRESHOLDS, key=lambda t: (fbeta(scored[t]), -t))
        held = {"rows": int(n_hold), **scored[threshold]}
    evidence, held_evidence = None, None
    if countries is not None:
        evidence, held_evidence = _fit_evidence(y, countries, hold, train, probs, cities)
    # every row: continued from the held-out fit (a third of its steps), or fitted from the base rates
    final_steps = max(1, steps // 3) if start is not None else steps
    head = _train_linear(x, yt, steps=final_steps, lr=lr, weight_decay=weight_decay, seed=seed, init=start)
    meta = {"features": int(x.shape[1]), "rows": len(labels), "steps": steps, "final_steps": final_steps,
            "holdout": held}
    if held_evidence:
        meta["holdout_evidence"] = held_evidence
    return ClueHead(head.weight.detach().clone(), head.bias.detach().clone(), mean, scale, vocab,
                    [texts[c] for c in vocab], float(threshold), meta, evidence)


def observation_texts(clues_uri: str) -> dict[str, str]:
    """clue id → its observation sentence in a ``clues.jsonl`` (the record marked ``observation``, else the clue's
    first country-free record)."""
    from georeasoner.core import storage

    first: dict[str, str] = {}
    marked: dict[str, str] = {}
    for line in storage.read_text(clues_uri).splitlines():
        try:
            r = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if not isinstance(r, dict) or not isinstance(r.get("clue"), str) or not isinstance(r.get("text"), str):
            continue
        if r.get("country") is None:
            first.setdefault(r["clue"], r["text"])
            if r.get("observation"):
                marked.setdefault(r["clue"], r["text"])
    return first | marked


def fit_on_rows(model, processor, rows: list[dict[str, Any]], clues_uri: str, *, seed: int = 0, steps: int = 300,
                batch: int = 64, log=print) -> ClueHead:
    """Fit a clue head on ``model``'s (frozen) tower over the rows that carry a ``clues`` list (their images read
    and processed here, ``batch`` at a time)."""
    import time

    import torch

    from georeasoner.vlm.batches import process_images

    labelled = [r for r in rows if isinstance(r.get("clues"), list)]
    if not labelled:
        raise ValueError("no row carries a 'clues' list: nothing to fit a clue head on")
    texts = observation_texts(clues_uri)
    t0 = time.monotonic()
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(labelled), batch):
        images = process_images(processor.image_processor, [r["image_uri"] for r in labelled[i:i + batch]])
        pv = torch.from_numpy(np.concatenate([p for p, _ in images])).float().to(device)
        grid = torch.from_numpy(np.stack([g for _, g in images])).long().to(device)
        feats.append(image_features(model, pv, grid).cpu())
    features = torch.cat(feats)
    t1 = time.monotonic()
    head = fit_clue_head(features, [r["clues"] for r in labelled], texts, seed=seed, steps=steps,
                         countries=[r.get("country") for r in labelled],
                         cities=[r.get("city") for r in labelled])
    log(f"clue head: {len(head.clues)} clues from {len(labelled)} rows ({features.shape[1]} features; images "
        f"{t1 - t0:.0f}s, fit {time.monotonic() - t1:.0f}s), threshold {head.threshold:.2f}, held out: "
        + (f"precision {head.meta['holdout']['precision']:.3f}, recall {head.meta['holdout']['recall']:.3f}"
           if head.meta.get("holdout") else "-")
        + (f"; clue evidence: {len(head.evidence.countries)} countries, temperature {head.evidence.temperature:g}"
           + (f", held-out country accuracy {head.meta['holdout_evidence']['country_accuracy']:.3f}"
              if head.meta.get("holdout_evidence") else "") if head.evidence is not None else ""))
    return head
