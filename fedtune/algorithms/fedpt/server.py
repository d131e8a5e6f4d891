"""FedPT (Gao et al., arXiv 2410.00362), the server half: the device trainer's server, wrapped
with proxy-tuning and distillation.

Each round: (1) the server broadcasts the small model, (2) devices tune it (the wrapped device
trainer: FedIT's LoRA by default, full FedAvg, or FedKSeed's zeroth-order steps), (3) the server
aggregates (the device trainer's own aggregation), (4) forms the proxy-tuned large model
s_large + α (s_tuned − s_base) with the large model behind its logits interface, and (5)
distils it into the aggregated small model on server-held prompts (:mod:`.distill`), which
becomes the next round's global small model. The messages, their bytes and the device side are
exactly the device trainer's: FedPT changes only what the server does between rounds.

The run's product, and what every evaluation scores, is the proxy-tuned large model
(:meth:`FedPTServer.evaluate`, :mod:`.product`). With FedKSeed devices, step (5) must reach devices
that rebuild the model from w0 and K per-seed accumulators: a gradient step cannot be written
that way (and shipping the distilled weights would cost the full model per device, which is what
FedKSeed devices avoid), so the server distils by zeroth-order steps along the pool's own seeds
(:func:`.distill.distill_zo`) and adds their Σ g to the accumulators: the next download is still
K scalars, and every device's replay lands on the distilled model.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune import seeds
from fedtune.algorithms.base import AcceptMean, Evaluate, ReplyInfo, SeedSteps, Server
from fedtune.algorithms.fedpt.config import FedPTConfig
from fedtune.algorithms.fedpt.distill import (
    Target,
    distill,
    distill_zo,
    large_targets,
    mean_kl,
    teacher_targets,
)
from fedtune.algorithms.fedpt.evaluate import evaluate_proxy
from fedtune.algorithms.fedpt.product import save_manifest
from fedtune.algorithms.fedpt.proxy import ProxyModel
from fedtune.data.prompts import end_of_turn_id, prompt_ids
from fedtune.data.records import Record
from fedtune.logits import LocalLogits, LogitsSource
from fedtune.logits.remote import remote_from_env
from fedtune.logits.service import ServiceProcess, spawn_service

log = logging.getLogger(__name__)
DISTILL_LOG = "fedpt_distill.json"
_LOG_KEY = "fedpt_distill_log"  # the distillation log in checkpoints, one row per round
_ANTI_PREFIX = "fedpt_anti_expert/"  # a distilled anti-expert's trained tensors in checkpoints
_LOG_FIELDS = ("round", "sequences", "positions", "kl_before", "kl_after", "train_loss")


def distill_records(cfg: Any) -> list[Record]:
    """The server's own prompt pool (never a device's data), per ``cfg.distill_data``.

    'generated': fedtune's suite drawn with ``distill_seed``, without the families the generated
    protocol holds out for evaluation.
    """
    if cfg.distill_data == "jsonl":
        out = []
        for n, line in enumerate(Path(cfg.distill_path).read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
                    raise ValueError(f"{cfg.distill_path}:{n}: expected an object with a string "
                                     "'instruction'")
                out.append(Record(row["instruction"], str(row.get("input") or ""), ""))
        return out
    from fedtune.data.generated import FAMILIES, training_suite

    return training_suite(max(4, -(-2 * cfg.distill_prompts // len(FAMILIES))), cfg.distill_seed)


class FedPTServer:
    """See :class:`fedtune.algorithms.base.Server`. ``inner`` is the device trainer's server
    half; ``model`` the one small model the server distils into (in process: the shared one)."""

    seed_steps: SeedSteps | None = None
    set_global: Callable[[torch.nn.Module], None] | None = None
    accept_mean: AcceptMean | None = None

    def __init__(self, cfg: FedPTConfig, inner: Server, model: torch.nn.Module, pad_id: int,
                 tokenizer: Any) -> None:
        if tokenizer is None:
            raise ValueError("FedPT needs the small model's tokenizer")
        self.cfg = cfg
        self.inner = inner
        self.name = "fedpt"
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self.model = model
        # s_base: the prepared model before any round (LoRA's B = 0: the base model's function)
        self.anti_expert = self._snapshot(model)
        self.service: ServiceProcess | None = None
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self._pool: list[Record] | None = None
        # the server's ΔA is the device trainer's (FedKSeed devices; the distillation is in A)
        self.download_since: Callable[[int, int], bytes] | None = inner.download_since
        self.device_share = inner.device_share
        self.evaluate: Evaluate | None = self._evaluate
        self.target_met: Callable[[dict[str, float]], bool] | None = self._target_met
        self.large: LogitsSource | None = self._connect()
        try:
            self.proxy()  # refuses a large model that does not share the small one's tokenizer
        except Exception:
            self.close()
            raise

    @staticmethod
    def _snapshot(model: torch.nn.Module) -> torch.nn.Module:
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen

    def _connect(self) -> LogitsSource:
        c = self.cfg
        if c.large_access == "url":
            log.info("FedPT: large model behind %s", c.large_url)
            return remote_from_env(c.large_url)  # token and CA: FEDTUNE_LOGITS_* variables
        device = next(self.model.parameters()).device
        if c.large_access == "spawn":
            self.service = spawn_service(c.large_model, device=device.type)
            atexit.register(self.close)
            log.info("FedPT: started `fedtune serve-logits %s` (pid %d) on %s", c.large_model,
                     self.service.process.pid, self.service.url)
            return self.service.client()  # with the token the service was given
        from fedtune.models.loading import load_model_and_tokenizer

        large, tok = load_model_and_tokenizer(c.large_model, "float32", device)
        return LocalLogits(large, tok, name=c.large_model)

    def close(self) -> None:
        """Stop the logits service this run started (if any)."""
        if self.service is not None:
            self.service.stop()
            log.info("FedPT: stopped the logits service (pid %d)", self.service.process.pid)
            self.service = None

    def proxy(self, tuned: torch.nn.Module | None = None, *,
              constrained: bool = True) -> ProxyModel:
        """The proxy-tuned large model with ``tuned`` (default: the device model) as expert;
        ``constrained = False`` leaves out the plausibility constraint (the distillation
        teacher: the papers' s̃, from which s_large is recovered exactly)."""
        if self.large is None:
            raise RuntimeError("the large model is not connected")
        tok = self.tokenizer
        return ProxyModel(self.large, LocalLogits(tuned or self.model, tok),
                          LocalLogits(self.anti_expert, tok), alpha=self.cfg.alpha,
                          plausibility=self.cfg.plausibility if constrained else 0.0)

    # -- server side --------------------------------------------------------------------------
    def download(self, round_: int, client_id: int) -> bytes:
        return self.inner.download(round_, client_id)

    def begin_round(self, round_: int) -> None:
        self.round = round_
        if self.cfg.anti_expert == "round-start":
            self.inner.load_global(self.model)
            self.anti_expert = self._snapshot(self.model)
        self.inner.begin_round(round_)

    def accept(self, payload: bytes) -> ReplyInfo:
        return self.inner.accept(payload)

    def end_round(self) -> None:
        self.inner.end_round()
        if self.cfg.distill:
            self._distill()

    def _distill(self) -> None:
        """Steps (4) and (5): teacher continuations on server prompts, then KL into the student."""
        c, tok, model = self.cfg, self.tokenizer, self.model
        self.inner.load_global(model)
        if self._pool is None:
            self._pool = distill_records(c)
        pick = seeds.rng(c.distill_seed, "distill-prompts", self.round).choice(
            len(self._pool), size=min(c.distill_prompts, len(self._pool)), replace=False)
        records = [self._pool[int(i)] for i in pick]
        frozen = copy.deepcopy(model).eval()  # the aggregated model inside the teacher
        proxy = self.proxy(frozen, constrained=False)
        targets = teacher_targets(proxy, [prompt_ids(r, tok) for r in records],
                                  max_new_tokens=c.distill_max_new_tokens,
                                  eos_id=end_of_turn_id(tok), pad_id=self.pad_id,
                                  batch_size=32)  # rows are independent: any batch
        t, v = c.distill_temperature, proxy.vocab_size
        # progress is always reported as the KL at T (whatever the training loss)
        before = mean_kl(model, targets, temperature=t, pad_id=self.pad_id, vocab_size=v)
        anti_targets = (large_targets(targets, frozen, self.anti_expert, alpha=c.alpha,
                                      pad_id=self.pad_id, vocab_size=v)
                        if c.anti_expert == "distilled" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        seed = seeds.derive(c.distill_seed, "distill-steps", self.round)
        zo, weights = self.inner.seed_steps, self.inner.set_global
        if zo is None and weights is None:
            raise RuntimeError(f"distillation cannot update {self.inner.name}'s global state")
        sums, loss = self._distill_steps(model, params, targets, seed, v)
        if zo is not None and sums is not None:  # FedKSeed devices: the steps folded into A
            zo.add_server_steps(sums)
            self.inner.load_global(model)  # what devices rebuild from the accumulators
        elif weights is not None:
            weights(model)  # the distilled student is the next round's global small model
        after = mean_kl(model, targets, temperature=t, pad_id=self.pad_id, vocab_size=v)
        if anti_targets is not None:
            self._distill_anti_expert(anti_targets, seed, v)
        self.history.append({"round": self.round, "sequences": len(targets),
                             "positions": sum(len(t.logits) for t in targets),
                             "kl_before": before, "kl_after": after, "train_loss": loss})
        log.info("FedPT round %d: distilled on %d sequences, KL to the teacher %.4f -> %.4f",
                 self.round, len(targets), before, after)

    def _distill_steps(self, model: torch.nn.Module, params: list[torch.nn.Parameter],
                       targets: list[Target], seed: int, v: int
                       ) -> tuple[dict[int, float] | None, float]:
        """Train ``params`` of ``model`` toward ``targets``: with FedKSeed devices by
        zeroth-order steps along the pool's seeds (returning their sums of g), else by AdamW
        (None). Returns (sums, mean loss)."""
        c, zo = self.cfg, self.inner.seed_steps
        kw: dict[str, Any] = {"batch_size": c.distill_batch_size,
                              "temperature": c.distill_temperature, "pad_id": self.pad_id,
                              "vocab_size": v, "loss": c.distill_loss, "seed": seed}
        if zo is not None:
            return distill_zo(model, params, zo.pool, targets, steps=c.distill_zo_steps,
                              eps=zo.eps, lr=zo.lr, z=zo.z, **kw)
        return None, distill(model, params, targets, steps=c.distill_steps, lr=c.distill_lr,
                             **kw)

    def _anti_params(self) -> dict[str, torch.nn.Parameter]:
        """The anti-expert's tensors that distillation trains: those the student trains (LoRA
        adapters, or the whole model), so both move in the same space by the same rule."""
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: p for n, p in self.anti_expert.named_parameters() if n in trained}

    def _distill_anti_expert(self, targets: list[Target], seed: int, v: int) -> None:
        """anti_expert = 'distilled': the student's step, toward the bare large model."""
        anti, t = self.anti_expert, self.cfg.distill_temperature
        params = list(self._anti_params().values())
        for p in params:
            p.requires_grad_(True)
        try:
            before = mean_kl(anti, targets, temperature=t, pad_id=self.pad_id, vocab_size=v)
            # the student's own rule (zeroth-order steps with FedKSeed devices); the sums of a
            # server-only model go nowhere
            self._distill_steps(anti, params, targets, seed, v)
            after = mean_kl(anti, targets, temperature=t, pad_id=self.pad_id, vocab_size=v)
        finally:
            for p in params:
                p.requires_grad_(False)
            anti.eval()
        log.info("FedPT round %d: anti-expert distilled toward the large model, KL %.4f -> %.4f",
                 self.round, before, after)

    def load_global(self, model: torch.nn.Module) -> None:
        self.inner.load_global(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # the global small model and the distillation log: the anti-expert is the base model or
        # rebuilt by begin_round, the large model never changes
        state = self.inner.state_dict()
        state[_LOG_KEY] = torch.tensor([[row[k] for k in _LOG_FIELDS] for row in self.history],
                                       dtype=torch.float64).reshape(-1, len(_LOG_FIELDS))
        if self.cfg.anti_expert == "distilled":
            for n, p in self._anti_params().items():
                state[_ANTI_PREFIX + n] = p.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        rows = state.pop(_LOG_KEY, None)
        anti = {k[len(_ANTI_PREFIX):]: state.pop(k) for k in list(state)
                if k.startswith(_ANTI_PREFIX)}
        self.inner.load_state_dict(state)
        if anti:
            params = self._anti_params()
            if set(anti) != set(params):
                raise ValueError("checkpoint's distilled anti-expert does not match this model: "
                                 f"{sorted(set(anti) ^ set(params))[:3]}")
            with torch.no_grad():
                for n, p in params.items():
                    if anti[n].shape != p.shape:
                        raise ValueError(f"checkpoint tensor {_ANTI_PREFIX + n!r} has shape "
                                         f"{tuple(anti[n].shape)}, expected {tuple(p.shape)}")
                    p.copy_(anti[n])
        if rows is not None:
            if rows.ndim != 2 or rows.shape[1] != len(_LOG_FIELDS):
                raise ValueError(f"checkpoint tensor {_LOG_KEY!r} has shape {tuple(rows.shape)}")
            self.history = [{k: (int(v) if k in ("round", "sequences", "positions") else float(v))
                             for k, v in zip(_LOG_FIELDS, row.tolist(), strict=True)}
                            for row in rows]

    # -- evaluation and result ----------------------------------------------------------------
    def _evaluate(self, model: torch.nn.Module, tokenizer: Any, records: Sequence[Record], *,
                 max_new_tokens: int, batch_size: int, max_length: int, rouge: bool,
                 loss: bool, template: str = "auto", scorer: str = "rouge-score"
                 ) -> dict[str, float]:
        """Score the product, the proxy-tuned large model (``model`` holds the global small)."""
        scores = evaluate_proxy(self.proxy(model), tokenizer, records,
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                max_length=max_length, rouge=rouge, loss=loss, template=template,
                                scorer=scorer)
        if rouge and self.cfg.eval_small:
            from fedtune.eval.evaluate import evaluate

            small = evaluate(model, tokenizer, records,  # type: ignore[arg-type]
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             max_length=max_length, rouge=True, loss=False, template=template,
                             scorer=scorer)
            scores["small_rougeL"] = small["rougeL"]
        return scores

    def _target_met(self, scores: dict[str, float]) -> bool:
        """The stopping rule: the proxy's Rouge-L reached ``stop_rougeL``."""
        goal = self.cfg.stop_rougeL
        return goal > 0 and scores.get("rougeL") is not None and scores["rougeL"] >= goal

    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """The tuned small model (the device trainer's export, ``model/``), the anti-expert and
        ``proxy/fedpt.json``: together the proxy-tuned large model. Stops a spawned service."""
        model_dir = self.inner.export(model, tokenizer, out_dir)
        proxy_dir = out_dir / "proxy"
        anti: Any = self.anti_expert
        assert anti is not None
        if hasattr(anti, "merge_and_unload"):  # a round-start snapshot of a LoRA model
            anti = copy.deepcopy(anti).merge_and_unload()
        anti.save_pretrained(proxy_dir / "anti_expert")  # type: ignore[operator]
        tokenizer.save_pretrained(proxy_dir / "anti_expert")
        info = self.proxy().vocab_size
        save_manifest(proxy_dir, large_model=self.cfg.large_model,
                      large_url=self.cfg.large_url if self.cfg.large_access == "url" else "",
                      alpha=self.cfg.alpha, plausibility=self.cfg.plausibility,
                      tuned="../model", anti_expert="anti_expert",
                      tokenizer_hash=LocalLogits(anti, tokenizer).hash, vocab_size=info)
        (out_dir / DISTILL_LOG).write_text(json.dumps(self.history, indent=1))
        self.close()
        return model_dir
