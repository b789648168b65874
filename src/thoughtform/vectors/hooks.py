"""Voice vectors in transformers: forward hooks that add a direction to decoder-block outputs.

The same files and the same place as llama.cpp: ``direction.<il>`` x strength is added to the
output of 0-based decoder block ``il`` (the residual stream after its FFN), for every position
of every forward pass while it is set. In a token-by-token loop over the KV cache each forward
carries only the new token, so :meth:`VectorHooks.set` before a forward steers that token and
those after it; positions already in the cache keep their activations, exactly as in llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .cvec import ControlVector


class VectorHooks:
    """Adds voice vectors to a causal LM's residual stream, switchable between forward passes."""

    def __init__(self, model: Any, vectors: Mapping[str, ControlVector]) -> None:
        from .train import decoder_layers

        self.model = model
        self.vectors = dict(vectors)
        self._layers = decoder_layers(model)
        n_embd = int(model.config.hidden_size)
        for name, cv in self.vectors.items():
            if cv.n_embd != n_embd:
                raise ValueError(f"vector {name!r}: length {cv.n_embd}, the model's {n_embd}")
            bad = [k for k in cv.layers if not 1 <= k < len(self._layers)]
            if bad:
                raise ValueError(
                    f"vector {name!r}: layer {bad[0]} outside 1..{len(self._layers) - 1}"
                )
        self._add: dict[int, Any] = {}  # layer -> tensor added to the block output
        self._active: tuple[tuple[str, float], ...] = ()
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ installing

    def install(self) -> VectorHooks:
        """Register one forward hook per decoder block (idempotent); nothing is added until set."""
        if not self._handles:
            self._handles = [
                layer.register_forward_hook(self._hook(il)) for il, layer in enumerate(self._layers)
            ]
        return self

    def remove(self) -> None:
        """Unregister the hooks; the model runs exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> VectorHooks:
        """Install on entry."""
        return self.install()

    def __exit__(self, *exc: object) -> None:
        """Remove on exit."""
        self.remove()

    def _hook(self, il: int) -> Any:
        def add(_module: Any, _inputs: Any, out: Any) -> Any:
            delta = self._add.get(il)
            if delta is None:
                return None
            if isinstance(out, tuple):
                return (out[0] + delta, *out[1:])
            return out + delta

        return add

    # ------------------------------------------------------------------ switching

    def __contains__(self, voice: object) -> bool:
        """Whether a vector is loaded for ``voice``."""
        return voice in self.vectors

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The (voice, strength) pairs in force, empty when none."""
        return self._active

    def set(self, voice: str, strength: float) -> None:
        """Steer the following forward passes with ``voice``'s vector x ``strength`` alone."""
        if voice not in self.vectors:
            raise KeyError(f"no vector for voice {voice!r}")
        self.set_many([(voice, strength)])

    def set_many(self, pairs: Iterable[tuple[str, float]]) -> None:
        """Steer with the sum of several voices' vectors (e.g. a whole-reply one plus a voice's)."""
        chosen = tuple((v, float(s)) for v, s in pairs if float(s) != 0.0)
        for v, _ in chosen:
            if v not in self.vectors:
                raise KeyError(f"no vector for voice {v!r}")
        self._add = self._sum([(self.vectors[v], s) for v, s in chosen])
        self._active = chosen

    def clear(self) -> None:
        """Stop steering: the following forward passes are the model's own."""
        self._add = {}
        self._active = ()

    def _sum(self, vectors: Sequence[tuple[ControlVector, float]]) -> dict[int, Any]:
        import torch

        p = next(self.model.parameters())
        acc: dict[int, Any] = {}
        for cv, s in vectors:
            for il, d in cv.directions.items():
                t = torch.from_numpy(d).to(device=p.device, dtype=torch.float32) * s
                acc[il] = acc[il] + t if il in acc else t
        return {il: t.to(p.dtype) for il, t in acc.items()}
