"""The conversation layer: one copy of the rules that turn settings, voices and history into a
backend and a request. The CLI, the workbench, the compare view and the proxy all call these."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .backends.base import BackendError, GenerationRequest, Message, Sampling
from .models import EMBEDDED_NAMES, EMBEDDED_VOICES, MODEL_CHOICES
from .steer import SteerError, SteerPlan, Structure, parse_order, parse_voice_sampling
from .voices import Voice, VoiceSet

# Characters of history kept for the model (most recent turns first): small models, small
# contexts. One budget for every caller (the CLI and the workbench used different ones).
HISTORY_CHARS = 12_000
DEFAULT_MODEL = EMBEDDED_VOICES  # the embedded model that speaks in voices (eval: form 1.00)

__all__ = [
    "DEFAULT_MODEL",
    "HISTORY_CHARS",
    "ChatSettings",
    "backend_options",
    "build_messages",
    "build_request",
    "check_model",
    "steer_plan",
    "voice_settings",
]


@dataclass(frozen=True)
class ChatSettings:
    """Everything that shapes one reply, as the user set it (CLI flags, workbench settings)."""

    backend: str = "llamacpp"
    model: str | None = DEFAULT_MODEL
    base_url: str | None = None
    api_key: str | None = None
    adapter: str | None = None  # llamacpp: a LoRA adapter (GGUF) over the model
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    alternatives: int = 5
    attention: bool = False
    logit_lens: bool = False
    voice_prompt: bool = True
    system: str = ""
    steer: SteerPlan = field(default_factory=SteerPlan)
    # How --structure is enforced on llamacpp: "conductor" (masking and forcing, token by token)
    # or "grammar" (the same structure as GBNF through llama.cpp's grammar sampler).
    structure_by: str = "conductor"
    # openai backend: which server it talks to, for steering ("auto" detects it).
    server: str = "auto"

    @property
    def conductor_plan(self) -> SteerPlan:
        """The plan the conductor runs (without the structure when a grammar enforces it)."""
        if self.structure_by == "grammar" and self.steer.structure is not None:
            return replace(self.steer, structure=None)
        return self.steer

    @property
    def sampling(self) -> Sampling:
        """The request's sampling."""
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=self.stop,
        )


def check_model(backend: str, model: str | None) -> str | None:
    """The model spec for ``backend`` (None: its default), or BackendError saying what fits.

    ``embedded`` and ``embedded-voices`` work on llamacpp and transformers; llamacpp otherwise
    needs a .gguf path; replay takes the recording; openai and plugins take any name.
    """
    m = (model or "").strip() or None
    if m in EMBEDDED_NAMES:
        m = None
    if backend in ("llamacpp", "transformers") and m in (None, EMBEDDED_VOICES):
        return m
    if backend == "llamacpp" and m is not None and not m.lower().endswith(".gguf"):
        raise BackendError(
            f"llamacpp needs a .gguf model path or one of {', '.join(MODEL_CHOICES)}, got {m!r}"
        )
    if backend == "transformers" and m is not None and m.lower().endswith(".gguf"):
        return m
    if backend == "transformers" and m is not None and not os.path.isdir(os.path.expanduser(m)):
        raise BackendError(
            f"transformers needs a local model directory, a .gguf file or one of"
            f" {', '.join(MODEL_CHOICES)}, got {m!r} (thoughtform never downloads)"
        )
    return m


def backend_options(settings: ChatSettings) -> dict[str, Any]:
    """The ``create_backend`` options for ``settings.backend`` (model checked against it)."""
    name = settings.backend
    if name == "openai":
        base_url = settings.base_url or os.environ.get("THOUGHTFORM_BASE_URL")
        if not base_url:
            raise BackendError(
                "the openai backend needs a base URL (--base-url, or THOUGHTFORM_BASE_URL)"
            )
        model = settings.model if settings.model not in (None, *MODEL_CHOICES) else None
        return {
            "base_url": base_url,
            "model": model or os.environ.get("THOUGHTFORM_MODEL"),
            "api_key": settings.api_key or os.environ.get("THOUGHTFORM_API_KEY"),
            "server": settings.server,
        }
    if name == "replay":
        if not settings.model or settings.model in MODEL_CHOICES:
            raise BackendError("the replay backend needs a recording (a trace JSONL or transcript)")
        return {"path": settings.model}
    if settings.adapter and name != "llamacpp":
        raise BackendError(f"only the llamacpp backend takes a LoRA adapter, not {name}")
    if name == "llamacpp" and settings.adapter:
        return {"model": check_model(name, settings.model), "lora_path": settings.adapter}
    if name in ("llamacpp", "transformers"):
        return {"model": check_model(name, settings.model)}
    return {"model": settings.model} if settings.model else {}


def voice_settings(settings: ChatSettings, voice: Voice) -> ChatSettings:
    """The settings ``voice`` speaks with: ``settings`` with the voice's own binding over them
    (voice-set ``backend`` / ``model`` / ``base_url`` / ``adapter``). On the same backend the
    fields the voice leaves out are the shared ones; on another backend they are that backend's
    defaults (the embedded voices model on llamacpp / transformers, the environment's
    ``THOUGHTFORM_BASE_URL`` / ``THOUGHTFORM_API_KEY`` on openai)."""
    if voice.backend is None:
        return settings
    if voice.backend == settings.backend:
        return replace(
            settings,
            model=voice.model or settings.model,
            base_url=voice.base_url or settings.base_url,
            adapter=voice.adapter or settings.adapter,
        )
    model = voice.model
    if model is None and voice.backend in ("llamacpp", "transformers"):
        model = DEFAULT_MODEL
    return replace(
        settings,
        backend=voice.backend,
        model=model,
        base_url=voice.base_url,
        api_key=None,
        adapter=voice.adapter,
        server="auto",
    )


def build_messages(
    voices: VoiceSet,
    history: Sequence[Message] | Sequence[tuple[str, str]],
    system: str = "",
    voice_prompt: bool = True,
    budget: int = HISTORY_CHARS,
) -> tuple[Message, ...]:
    """System message (the voice prompt, then the user's own system text) and the most recent
    history that fits ``budget`` characters (the newest message always)."""
    from .prompting import voice_system_prompt

    parts = []
    if voice_prompt:
        vp = voice_system_prompt(voices)
        if vp:
            parts.append(vp)
    if system and system.strip():
        parts.append(system.strip())
    msgs = [m if isinstance(m, Message) else Message(m[0], m[1]) for m in history]
    msgs = [m for m in msgs if m.role in ("user", "assistant", "system") and m.content]
    kept: list[Message] = []
    for m in reversed(msgs):
        if kept and budget - len(m.content) < 0:
            break
        budget -= len(m.content)
        kept.append(m)
    kept.reverse()
    head = [Message("system", "\n\n".join(parts))] if parts else []
    return tuple(head + kept)


def build_request(
    settings: ChatSettings, voices: VoiceSet, history: Sequence[Message] | Sequence[tuple[str, str]]
) -> GenerationRequest:
    """The request for the next reply in a conversation."""
    voice_prompt = settings.voice_prompt
    if voice_prompt and settings.backend in ("llamacpp", "transformers"):
        # The voices model was trained without a system prompt; the voice prompt only confuses
        # it (the plain model needs it, and still rarely follows it: form 0.00 in the eval).
        voice_prompt = (settings.model or "").strip() != EMBEDDED_VOICES
    grammar = None
    if settings.structure_by == "grammar" and settings.steer.structure is not None:
        from .steer import structure_gbnf

        grammar = structure_gbnf(voices, settings.steer.structure, settings.steer.mute)
    return GenerationRequest(
        messages=build_messages(voices, history, settings.system, voice_prompt),
        sampling=settings.sampling,
        alternatives=settings.alternatives,
        attention=settings.attention,
        logit_lens=settings.logit_lens,
        grammar=grammar,
    )


def steer_plan(
    voices: VoiceSet,
    next_voice: str | None = None,
    mute: Iterable[str] = (),
    voice_sampling: Iterable[str] | Mapping[str, tuple[float | None, float | None]] = (),
    structure: bool = False,
    order: Iterable[str] = (),
    score_voices: bool = True,
    vectors: Mapping[str, float] | None = None,
    voice_vectors: str | None = None,
    whole_vectors: Iterable[str] = (),
) -> SteerPlan:
    """A checked steering plan from user-level options (names resolved against ``voices``);
    raises SteerError with a one-line reason.

    ``voice_vectors`` names a vector directory or shipped set ("" or "seed": the shipped one):
    every voice with a vector there gets it while it speaks, at the strength its voice set gives
    (``vector:``) or the set's default. ``whole_vectors`` are ``NAME=STRENGTH`` items applied to
    the whole reply (what llama.cpp's ``--control-vector-scaled`` does)."""
    vs = (
        dict(voice_sampling)
        if isinstance(voice_sampling, Mapping)
        else parse_voice_sampling(voice_sampling)
    )
    order = list(order)
    st: Structure | None = parse_order(order) if (structure or order) else None
    if order and not structure:
        raise SteerError("--order needs --structure")
    per_voice = dict(vectors or {})
    whole: dict[str, float] = {}
    vector_dir = None
    for item in whole_vectors:
        name, sep, val = item.partition("=")
        try:
            whole[name.strip()] = float(val) if sep else 1.0
        except ValueError:
            raise SteerError(f"vector {item!r}: expected NAME=STRENGTH") from None
    if voice_vectors is not None or whole:
        from .vectors.cvec import VectorFileError
        from .vectors.sets import load_vector_set

        vector_dir = voice_vectors or "seed"
        try:
            vset = load_vector_set(vector_dir)
        except VectorFileError as e:
            raise SteerError(str(e)) from None
        for name in whole:
            if vset.get(name) is None:
                raise SteerError(f"vector {name!r}: not in {vset.path}")
        if voice_vectors is not None:
            for v in voices.voices:
                if v.name not in per_voice and vset.get(v.name) is not None:
                    per_voice[v.name] = vset.strength(v.name, voices)
    plan = SteerPlan(
        next_voice=next_voice or None,
        mute=frozenset(mute),
        voice_sampling=vs,
        structure=st,
        score_voices=score_voices,
        vectors=per_voice,
        whole_vectors=whole,
        vector_dir=vector_dir,
    )
    plan = plan.resolved(voices)
    if plan.next_voice and plan.next_voice in plan.mute:
        raise SteerError(f"next voice {plan.next_voice!r} is muted")
    return plan


def with_plan(settings: ChatSettings, plan: SteerPlan) -> ChatSettings:
    """A copy of ``settings`` with another steering plan."""
    return replace(settings, steer=plan)
