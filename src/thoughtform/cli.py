"""The ``thoughtform`` command line: thin over the library."""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from .parse import Segment, SegmentBuilder, VoiceParser
from .trace import TraceError, is_trace_text, load_trace
from .voices import PRESETS, STARTER_YAML, VoiceSet, VoiceSetError, json_schema_text
from .voices import resolve_voice_set as _resolve


class UserError(Exception):
    """A mistake in how the command was called or in its input: one line, exit code 2."""


def resolve_voices(spec: str | None) -> VoiceSet:
    """The voice set for ``--voices`` (preset or file), as a user error when invalid."""
    try:
        return _resolve(spec)
    except VoiceSetError as e:
        raise UserError(str(e)) from None


def _read_chunks(path: str, size: int = 1 << 16) -> Iterator[str]:
    """Decode a file (or stdin for '-') incrementally as UTF-8; a BOM is dropped."""
    if path == "-":
        fh = sys.stdin.buffer
        close = False
    else:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"{path}: is a directory, expected a text file")
        try:
            fh = open(p, "rb")
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e.strerror}") from None
        close = True
    dec = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    offset = 0
    try:
        while True:
            b = fh.read(size)
            try:
                text = dec.decode(b, final=not b)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}: byte {offset + e.start}: not valid UTF-8 (0x{b[e.start]:02x})"
                    if e.start < len(b)
                    else f"{path}: byte {offset + e.start}: not valid UTF-8"
                ) from None
            if text:
                yield text
            if not b:
                break
            offset += len(b)
    finally:
        if close:
            fh.close()


def _pieces(chunks: Iterator[str], n: int | None) -> Iterator[str]:
    if not n:
        yield from chunks
        return
    buf = ""
    for c in chunks:
        buf += c
        while len(buf) >= n:
            yield buf[:n]
            buf = buf[n:]
    if buf:
        yield buf


def cmd_parse(args: argparse.Namespace) -> int:
    """Print segments of a transcript as they close (constant memory for jsonl/text)."""
    vs = resolve_voices(args.voices)
    parser = VoiceParser(vs, starts_in=args.starts_in)
    builder = SegmentBuilder()
    out = sys.stdout
    collected: list[dict[str, Any]] = []

    def emit(seg: Segment) -> None:
        if not seg.text:
            return  # whitespace-only segments are not printed
        if args.format == "jsonl":
            out.write(json.dumps(seg.to_dict(), ensure_ascii=False) + "\n")
        elif args.format == "json":
            collected.append(seg.to_dict())
        else:
            out.write(f"[{seg.voice}] {seg.text}\n\n")

    def drain(final: bool) -> None:
        segs = builder.segments
        keep = 0 if final or builder.current is None else 1
        while len(segs) > keep:
            emit(segs.pop(0))

    for piece in _pieces(_read_chunks(args.file), args.chunk):
        builder.add(parser.feed(piece))
        drain(False)
    builder.add(parser.close())
    drain(True)
    if args.format == "json":
        out.write(json.dumps(collected, ensure_ascii=False, indent=2) + "\n")
    return 0


def _load_for_render(path: str, vs: VoiceSet, starts_in: str | None) -> Any:
    from .render import trace_from_text

    text = "".join(_read_chunks(path))
    if is_trace_text(text[:65536]):
        try:
            if path == "-":
                from .trace import parse_trace_lines

                return parse_trace_lines(text, "<stdin>")  # split on "\n" only
            return load_trace(path)
        except TraceError as e:
            raise UserError(str(e)) from None
    return trace_from_text(text, vs, starts_in=starts_in)


def cmd_render(args: argparse.Namespace) -> int:
    """Render a transcript or trace to a standalone HTML report or the terminal."""
    trace = _load_for_render(args.file, resolve_voices(args.voices), args.starts_in)
    vs = resolve_voices(args.voices) if args.voices else _trace_voices(trace)
    if args.out:
        from .render.html import render_report

        html = render_report(trace, vs, tokens=args.tokens, title=args.title)
        try:
            Path(args.out).write_text(html, encoding="utf-8")
        except OSError as e:
            raise UserError(f"{args.out}: cannot write: {e.strerror}") from None
        print(f"wrote {args.out} ({len(html):,} bytes)", file=sys.stderr)
        return 0
    from rich.console import Console

    from .render.terminal import render_terminal

    render_terminal(trace, vs, Console(), tokens=args.tokens)
    return 0


def _trace_voices(trace: Any) -> VoiceSet:
    """The voice set recorded in a trace's metadata, else the seed preset."""
    from .voices import voice_set_from_dict

    data = trace.meta.get("voice_set") if hasattr(trace, "meta") else None
    if isinstance(data, dict):
        try:
            return voice_set_from_dict(data, "<trace meta>")
        except VoiceSetError:
            pass
    name = trace.meta.get("voices") if hasattr(trace, "meta") else None
    return PRESETS.get(name or "seed", PRESETS["seed"])


def cmd_voices(args: argparse.Namespace) -> int:
    """List presets, show a voice set, write a starter file, or print the JSON Schema."""
    if args.action == "list":
        for name, vs in PRESETS.items():
            names = ", ".join(v.name for v in vs.voices) or "(no voices)"
            print(f"{name:8} {vs.unknown:8} {names}")
        return 0
    if args.action == "show":
        if not args.name:
            raise UserError("voices show: give a preset name or a .yaml path")
        sys.stdout.write(resolve_voices(args.name).to_yaml())
        return 0
    if args.action == "init":
        if not args.name:
            raise UserError("voices init: give the PATH to write")
        p = Path(args.name)
        if p.exists() and not args.force:
            raise UserError(f"{p}: already exists (use --force to overwrite)")
        try:
            p.write_text(STARTER_YAML, encoding="utf-8")
        except OSError as e:
            raise UserError(f"{p}: cannot write: {e.strerror}") from None
        print(f"wrote {p}", file=sys.stderr)
        return 0
    sys.stdout.write(json_schema_text() + "\n")
    return 0


# -- generation ------------------------------------------------------------------------------


def chat_settings(args: argparse.Namespace, vs: VoiceSet) -> Any:
    """The library's ChatSettings (with a checked steering plan) from generation flags."""
    from .conversation import ChatSettings, steer_plan
    from .steer import SteerError

    try:
        plan = steer_plan(
            vs,
            next_voice=args.next_voice,
            mute=args.mute or (),
            voice_sampling=args.voice_sampling or (),
            structure=args.structure,
            order=args.order or (),
            score_voices=not args.no_voice_scores,
            voice_vectors=args.voice_vectors,
            whole_vectors=args.vector or (),
        )
    except SteerError as e:
        raise UserError(str(e)) from None
    model = args.model
    if model is None and args.backend in ("llamacpp", "transformers"):
        from .conversation import DEFAULT_MODEL

        model = DEFAULT_MODEL
    return ChatSettings(
        backend=args.backend,
        model=model,
        base_url=args.base_url,
        api_key=args.api_key,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
        alternatives=args.alternatives,
        attention=args.attention,
        voice_prompt=not args.no_voice_prompt,
        system=args.system or "",
        steer=plan,
        structure_by=args.structure_by,
        server=args.server_kind,
    )


def make_backend(args: argparse.Namespace, settings: Any = None) -> Any:
    """Create the backend named by ``--backend`` with its options, or raise UserError."""
    from .backends import BackendError, create_backend
    from .conversation import backend_options

    settings = settings or chat_settings(args, resolve_voices(getattr(args, "voices", None)))
    try:
        opts = backend_options(settings)
        if args.backend == "replay":
            opts["rate"] = args.rate
        return create_backend(args.backend, **opts)
    except BackendError as e:
        raise UserError(str(e)) from None
    except TraceError as e:
        raise UserError(str(e)) from None


def _run_generation(
    args: argparse.Namespace,
    backend: Any,
    vs: VoiceSet,
    settings: Any,
    history: Sequence[tuple[str, str]],
) -> Any:
    from rich.console import Console

    from .conversation import build_request
    from .generate import Generation
    from .render.terminal import LiveRenderer

    console = Console(highlight=False)
    live = LiveRenderer(console, vs)
    gen = Generation(
        backend,
        build_request(settings, vs, history),
        vs,
        starts_in=args.starts_in,
        trace_path=args.trace,
        steer=settings.conductor_plan,
    )
    finish = None
    it = iter(gen)
    try:
        for upd in it:
            if upd.events:
                live.on_events(upd.events)
            if upd.finish is not None:
                finish = upd.finish
    except KeyboardInterrupt:
        # Closing the iterator finishes the trace as cancelled, keeping the partial reply.
        close = getattr(it, "close", None)
        if close is not None:
            close()
        finish = None
        console.print()
        console.print("[dim](stopped)[/dim]")
    console.print()
    if finish is not None and finish.reason == "error":
        print(f"thoughtform: backend error: {finish.message}", file=sys.stderr)
    return gen


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one reply, streaming voices to the terminal; optionally write the trace."""
    vs = resolve_voices(args.voices)
    if args.prompt is None:
        raise UserError("generate: give --prompt TEXT")
    if not args.prompt.strip():
        raise UserError("generate: --prompt is empty (write what the model should answer)")
    settings = chat_settings(args, vs)
    backend = make_backend(args, settings)
    try:
        gen = _run_generation(args, backend, vs, settings, [("user", args.prompt)])
    finally:
        backend.close()
    fin = gen.trace.finish or {}
    if args.trace:
        print(f"trace: {args.trace} ({len(gen.trace.tokens)} tokens)", file=sys.stderr)
    return 1 if fin.get("reason") == "error" else 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive terminal chat; Ctrl-C stops a reply, Ctrl-D (or /quit) leaves."""
    vs = resolve_voices(args.voices)
    settings = chat_settings(args, vs)
    backend = make_backend(args, settings)
    history: list[tuple[str, str]] = []
    trace_base = args.trace
    turn = 0
    try:
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line.strip() in ("/quit", "/exit"):
                return 0
            if not line.strip():
                continue
            history.append(("user", line))
            turn += 1
            if trace_base:
                stem = Path(trace_base)
                args.trace = str(stem.with_name(f"{stem.stem}.{turn}{stem.suffix or '.jsonl'}"))
            gen = _run_generation(args, backend, vs, settings, history)
            history.append(("assistant", gen.trace.text))
    finally:
        backend.close()


def _load_trace_arg(path: str) -> Any:
    try:
        return load_trace(path)
    except TraceError as e:
        raise UserError(str(e)) from None


def cmd_branch(args: argparse.Namespace) -> int:
    """Branch a recorded reply at a token: an alternative token, any text, or another voice."""
    from .loom import Fork, LoomError, branch, trace_voice_set

    parent = _load_trace_arg(args.trace)
    try:
        fork = Fork(args.at, token_id=args.token_id, text=args.token, voice=args.voice)
    except LoomError as e:
        raise UserError(str(e)) from None
    vs = trace_voice_set(parent, args.voices)
    from .backends import BackendError, create_backend
    from .loom import branch_model, check_branch_backend

    if args.backend == "openai":
        opts: dict[str, Any] = {
            "base_url": args.base_url,
            "model": args.model,
            "api_key": args.api_key,
            "server": args.server_kind,
            "chat_template": args.chat_template,
        }
    else:
        opts = {"model": branch_model(parent, args.model)}
    try:
        backend = create_backend(args.backend, **opts)
    except BackendError as e:
        raise UserError(str(e)) from None
    try:
        check_branch_backend(backend)
        kids = branch(
            backend, parent, fork, n=args.n, seed=args.seed, max_tokens=args.max_tokens, voices=vs
        )
    except (LoomError, BackendError) as e:
        raise UserError(str(e)) from None
    finally:
        backend.close()
    out = Path(args.out)
    if args.n > 1 or out.suffix != ".jsonl":
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"branch-{i + 1}.jsonl" for i in range(len(kids))]
    else:
        paths = [out]
    from rich.console import Console

    from .render.terminal import render_terminal

    console = Console(highlight=False)
    for p, kid in zip(paths, kids, strict=True):
        try:
            kid.save(p)
        except OSError as e:
            raise UserError(f"{p}: cannot write: {e.strerror}") from None
        console.rule(f"{p.name}  {fork.describe()}  seed {kid.meta['branch']['seed']}")
        render_terminal(kid, vs, console)
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two branches from their fork, voice by voice."""
    from .loom import compare

    a, b = _load_trace_arg(args.a), _load_trace_arg(args.b)
    res = compare(a, b, at=args.at)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"fork at token {res['fork']}")
    print(f"  A voices: {' > '.join(res['a']['voices']) or '(none)'}")
    print(f"  B voices: {' > '.join(res['b']['voices']) or '(none)'}")
    if res["appeared"]:
        print(f"  appear in B: {', '.join(res['appeared'])}")
    if res["vanished"]:
        print(f"  vanish in B: {', '.join(res['vanished'])}")
    if res["reordered"]:
        print("  shared voices in another order")
    for side in ("a", "b"):
        for v, st in res[side]["stats"].items():
            print(
                f"  {side.upper()} {v:12} tokens {st['tokens']:4}  surprisal {st['mean_surprisal']}"
                f" bits  entropy {st['mean_entropy']}"
            )
    pa, pb = res["a"]["forked_token_p_under_b"], res["b"]["forked_token_p_under_a"]
    if pb is not None:
        print(f"  p(B's forked token) under A: {pb:.4f}")
    if pa is not None:
        print(f"  p(A's forked token) under B: {pa:.4f}")
    rc = res["reconverge"]
    print(
        f"  re-converge: A word {rc['a_word']}, B word {rc['b_word']}: {rc['words']!r}"
        if rc
        else "  re-converge: never"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The embedded model and its path, the backends installed and their capabilities."""
    from .backends import BUILTIN, available_backends

    try:
        from .models import embedded_gguf_path

        path: Any = embedded_gguf_path()
        size = f"{Path(path).stat().st_size / 1e6:.1f} MB"
    except Exception as e:  # report, don't fail: this command is a diagnosis
        path, size = f"not found ({e})", ""
    print(f"embedded model: SmolLM2-135M-Instruct Q4_1  {path}  {size}")
    try:
        from .adapters import voices_adapter_path

        adapter = voices_adapter_path()
        print(
            f"voices adapter (--model embedded-voices): {adapter if adapter.is_file() else 'not built'}"
        )
    except ImportError:
        pass
    # Options that build each backend without a network call; transformers loads a model
    # (seconds), so only with --all.
    probe: dict[str, dict[str, Any]] = {
        "llamacpp": {},
        "openai": {"base_url": "http://127.0.0.1:8000/v1", "model": "(server's)"},
        "replay": {"text": ""},
    }
    if args.all:
        probe["transformers"] = {}
    print("backends:")
    for name in available_backends():
        mod = BUILTIN.get(name, "(plugin)").split(":")[0]
        try:
            if name in BUILTIN:
                __import__(mod)
        except ImportError as e:
            print(f"  {name:13} not installed ({e.name})")
            continue
        if name not in probe:
            print(
                f"  {name:13} installed"
                + ("" if name not in BUILTIN else " (--all shows its capabilities)")
            )
            continue
        from .backends import create_backend

        try:
            backend = create_backend(name, **probe[name])
        except Exception as e:  # a diagnosis command reports, it does not fail
            print(f"  {name:13} installed, cannot start: {e}")
            continue
        caps = backend.capabilities
        backend.close()
        flags = [k for k, v in caps.to_dict().items() if v is True]
        alts = f"alternatives<={caps.max_alternatives}" if caps.max_alternatives else ""
        print(f"  {name:13} installed  {' '.join(x for x in [alts, *flags] if x)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the Gradio workbench."""
    try:
        from .ui.app import ServeConfig, serve
    except ImportError as e:
        raise UserError(
            f"serve needs the ui extra: pip install 'thoughtform[ui]' ({e.name})"
        ) from None
    from .ui.config import ConfigError, auth_file_warning, check_exposure, resolve_auth

    try:
        auth = resolve_auth(args.auth, args.auth_file)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if args.auth_file and (warn := auth_file_warning(args.auth_file)):
        print(warn, file=sys.stderr)
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    resolve_voices(args.voices)
    model = args.model
    if args.backend == "llamacpp" and model is None and args.replay is None:
        # The embedded model with the shipped voices adapter speaks in voices (eval: 100% of
        # replies well-formed against 0% for the plain model prompted with the voices).
        from .adapters import voices_adapter_path

        if voices_adapter_path().is_file():
            model = "embedded-voices"
    cfg = ServeConfig(
        backend=args.backend,
        model=model,
        base_url=args.base_url,
        replay=args.replay,
        voices=args.voices or "seed",
        host=args.host,
        port=args.port,
        db=args.db,
        auth=auth,
        insecure=args.insecure,
        voice_prompt=not args.no_voice_prompt,
        replay_rate=args.rate,
        max_tokens=args.max_tokens,
    )
    try:
        check_exposure(cfg)  # refused before anything is opened (serve prints the warning)
    except ConfigError as e:
        raise UserError(str(e)) from None
    serve(cfg)
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    """Start the OpenAI-compatible proxy (see :mod:`thoughtform.proxy`)."""
    from .proxy.cli import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark and print its numbers (``--json`` for one JSON object)."""
    if args.what == "parse":
        from .bench.parse import bench_parse

        res = bench_parse(size_mb=args.size_mb)
    elif args.what == "backend":
        from .bench.backend import bench_backend

        res = bench_backend(
            tokens=args.tokens, transformers=not args.no_transformers, threads=args.threads
        )
    elif args.what == "branch":
        from .bench.branch import bench_branch

        res = bench_branch(tokens=args.tokens or 64, backend_name=args.backend)
    elif args.what == "steer":
        from .bench.steer import bench_steer

        res = bench_steer(tokens=args.tokens or 200)
    elif args.what == "proxy":
        from .bench.proxy import bench_proxy

        res = bench_proxy(tokens=args.tokens or 200)
    else:
        from .bench.ui import bench_ui

        res = bench_ui(tokens=args.tokens or 4000)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28} {v:,.3f}" if isinstance(v, float) else f"{k:28} {v}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    """Delegate to the dataset tool."""
    from .data.cli import cli_dataset

    return cli_dataset(list(args.rest))


def cmd_train(args: argparse.Namespace) -> int:
    """Delegate to LoRA training."""
    try:
        from .train.cli import cli_train
    except ImportError as e:
        raise UserError(
            f"train needs the train extra: pip install 'thoughtform[train]' ({e.name})"
        ) from None
    return cli_train(list(args.rest))


def cmd_eval(args: argparse.Namespace) -> int:
    """Delegate to the evaluations (``eval adherence``)."""
    from .evaluate.cli import cli_eval

    return cli_eval(list(args.rest))


def cmd_council(args: argparse.Namespace) -> int:
    """Delegate to the council (voices taking turns: ``thoughtform council --help``)."""
    from .council_cli import cli_council

    return cli_council(list(args.rest))


def cmd_vectors(args: argparse.Namespace) -> int:
    """Delegate to voice vectors (``vectors train|path|list|show``)."""
    from .vectors.cli import cli_vectors

    return cli_vectors(list(args.rest))


# -- argument parser -------------------------------------------------------------------------


def _gen_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="llamacpp",
        help="llamacpp | openai | transformers | replay, or an installed plugin (default: llamacpp)",
    )
    p.add_argument(
        "--model",
        help="embedded | embedded-voices (the embedded model with the shipped voices adapter;"
        " the default on llamacpp and transformers) | a .gguf path | a local HF directory |"
        " the server's model name (openai) | the recording (replay)",
    )
    p.add_argument(
        "--base-url", help="OpenAI-compatible server URL (default: env THOUGHTFORM_BASE_URL)"
    )
    p.add_argument("--api-key", help="API key (default: env THOUGHTFORM_API_KEY)")
    p.add_argument(
        "--server-kind",
        choices=["auto", "vllm", "llamacpp", "llama-cpp-python", "openai"],
        default="auto",
        help="openai backend: the server behind --base-url, for steering (default: auto, detected)",
    )
    p.add_argument("--system", help="extra system prompt text (default: none)")
    p.add_argument(
        "--voices",
        default="seed",
        help="voice set: seed | think | plain | a YAML path (default: seed)",
    )
    p.add_argument(
        "--no-voice-prompt",
        action="store_true",
        help="do not describe the voices in a system prompt (default: described, except to"
        " embedded-voices, which was trained without it)",
    )
    p.add_argument("--starts-in", help="voice the output starts inside, e.g. think (default: none)")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature, 0 = greedy (default: 0.7)",
    )
    p.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)"
    )
    p.add_argument("--top-k", type=int, default=0, help="top-k truncation, 0 = off (default: 0)")
    p.add_argument("--seed", type=int, help="seed for a repeatable reply (default: random)")
    p.add_argument("--stop", action="append", help="stop string, repeatable (default: none)")
    p.add_argument(
        "--alternatives",
        type=int,
        default=5,
        help="top alternatives recorded per token (default: 5)",
    )
    p.add_argument(
        "--attention",
        action="store_true",
        help="capture attention (transformers backend; default: off)",
    )
    p.add_argument("--trace", help="write the trace JSONL here (default: none)")
    p.add_argument(
        "--rate", type=float, default=0.0, help="replay: tokens/s, 0 = unthrottled (default: 0)"
    )
    g = p.add_argument_group("steering")
    g.add_argument(
        "--next-voice",
        metavar="NAME",
        help="the voice that opens the reply (forced marker; default: the model chooses)",
    )
    g.add_argument(
        "--mute",
        action="append",
        metavar="NAME",
        help="a voice whose marker can never be generated, repeatable (default: none)",
    )
    g.add_argument(
        "--voice-sampling",
        action="append",
        metavar="NAME=T[,P]",
        help="temperature (and top-p) while that voice speaks, repeatable; overrides the voice"
        " set (default: the voice set's, else --temperature/--top-p)",
    )
    g.add_argument(
        "--structure",
        action="store_true",
        help="a reply that always parses: 2..N declared voice blocks, no voice twice in a row,"
        " nothing outside voices, blocks bounded in length (default: off)",
    )
    g.add_argument(
        "--structure-by",
        choices=["conductor", "grammar"],
        default="conductor",
        help="how --structure is enforced: the conductor masks and forces tokens (any voice"
        " choice rule), or a GBNF grammar (llamacpp's grammar sampler; no max-per-voice)"
        " (default: conductor)",
    )
    g.add_argument(
        "--order",
        action="append",
        metavar="RULE",
        help="with --structure: first=NAME, never-first=NAME, max-per-voice=N, min-blocks=N,"
        " max-blocks=N, block-tokens=N; repeatable (default: none)",
    )
    g.add_argument(
        "--voice-vectors",
        nargs="?",
        const="",
        metavar="DIR",
        help="steer each voice from inside the model with its voice vector while it speaks;"
        " DIR is a vector directory (default without DIR: the shipped seed vectors; off when"
        " not given). Strengths: the voice set's 'vector' field, else the set's defaults",
    )
    g.add_argument(
        "--vector",
        action="append",
        metavar="NAME=S",
        help="apply voice NAME's vector at strength S to the whole reply, repeatable"
        " (default: none)",
    )
    g.add_argument(
        "--no-voice-scores",
        action="store_true",
        help="do not score who speaks next at each voice boundary (default: scored)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of all subcommands."""
    ap = argparse.ArgumentParser(
        prog="thoughtform", description="See and steer the inner voices of a language model."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parse", help="split a transcript into voice segments")
    p.add_argument("file", nargs="?", default="-", help="a transcript, - for stdin")
    p.add_argument("--voices", default="seed", help="voice set: preset or YAML path")
    p.add_argument(
        "--format", choices=["jsonl", "json", "text"], default="jsonl", help="output format"
    )
    p.add_argument("--chunk", type=int, help="feed N characters at a time (none: whole reads)")
    p.add_argument("--starts-in", help="voice the text starts inside, e.g. think")
    p.set_defaults(func=cmd_parse)

    p = sub.add_parser("render", help="render a transcript or trace (HTML report or terminal)")
    p.add_argument("file", help="a transcript or trace JSONL, - for stdin")
    p.add_argument("--voices", help="voice set (none: the one recorded in the trace, else seed)")
    p.add_argument("--out", help="write a standalone HTML report here (none: the terminal)")
    p.add_argument("--tokens", action="store_true", help="token mode: shading and alternatives")
    p.add_argument("--title", help="the report's title (none: from the trace)")
    p.add_argument("--starts-in", help="voice the text starts inside, e.g. think")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("voices", help="list, show or create voice sets")
    p.add_argument("action", choices=["list", "show", "init", "schema"], help="what to do")
    p.add_argument("name", nargs="?", help="show: a preset or YAML path; init: the file to write")
    p.add_argument("--force", action="store_true", help="init: overwrite an existing file")
    p.set_defaults(func=cmd_voices)

    p = sub.add_parser("generate", help="generate one reply with token telemetry")
    p.add_argument("--prompt", help="what the model answers (required, not empty)")
    _gen_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat in voices")
    _gen_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("branch", help="branch a recorded reply at a token (loom)")
    p.add_argument("trace", help="the parent trace JSONL")
    p.add_argument("--at", type=int, required=True, help="token index of the fork")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--token-id", type=int, help="force this token id at the fork")
    what.add_argument("--token", help="force this text at the fork")
    what.add_argument("--voice", help="let this voice open at the fork")
    p.add_argument("--n", type=int, default=1, help="children sampled together (default: 1)")
    p.add_argument("--seed", type=int, help="seed of the first child; child i gets seed+i")
    p.add_argument("--max-tokens", type=int, help="new tokens per child (default: the parent's)")
    p.add_argument(
        "--model",
        help="embedded | embedded-voices | .gguf (default: the parent's); openai: the server's"
        " model name",
    )
    p.add_argument("--voices", help="voice set (default: the one recorded in the trace)")
    p.add_argument("--out", required=True, help="OUT.jsonl for one child, or a directory")
    p.add_argument(
        "--backend",
        choices=["llamacpp", "transformers", "openai"],
        default="llamacpp",
        help="llamacpp / transformers continue from the parent's token ids; openai re-sends its"
        " text to --base-url (slower, ids not guaranteed) (default: llamacpp)",
    )
    p.add_argument("--base-url", help="openai: server URL (default: env THOUGHTFORM_BASE_URL)")
    p.add_argument("--api-key", help="openai: API key (default: env THOUGHTFORM_API_KEY)")
    p.add_argument(
        "--server-kind",
        choices=["auto", "vllm", "llamacpp", "llama-cpp-python", "openai"],
        default="auto",
        help="openai: the server behind --base-url (default: auto, detected)",
    )
    p.add_argument(
        "--chat-template",
        help="openai: the model's chat template (Jinja text, a file or a .gguf), to continue a"
        " chat reply on a server with no assistant prefill (default: env"
        " THOUGHTFORM_CHAT_TEMPLATE)",
    )
    p.set_defaults(func=cmd_branch)

    p = sub.add_parser("compare", help="compare two branches voice by voice")
    p.add_argument("a", help="a branch trace JSONL (e.g. the parent)")
    p.add_argument("b", help="another branch trace JSONL")
    p.add_argument("--at", type=int, help="fork index (default: where they first differ)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="the embedded model and installed backends")
    p.add_argument("--all", action="store_true", help="also load transformers for its capabilities")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "serve",
        help="start the web workbench",
        description="Start the web workbench. On a loopback host it answers only requests that "
        "name it (Host) and come from its own page (Origin).",
    )
    p.add_argument(
        "--backend",
        default="llamacpp",
        help="llamacpp | openai | transformers | replay (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        help="GGUF path, embedded or embedded-voices, HF dir, or server model name "
        "(default: embedded-voices with llamacpp)",
    )
    p.add_argument(
        "--base-url", help="OpenAI-compatible server URL, for --backend openai (default: none)"
    )
    p.add_argument(
        "--replay",
        help="replay this trace/transcript (or a directory of them) instead of a model; "
        "a recording always plays whole, whatever Max tokens says (default: none)",
    )
    p.add_argument(
        "--rate", type=float, default=0.0, help="replay tokens/s, 0 = unthrottled (default: 0)"
    )
    p.add_argument(
        "--voices", default="seed", help="voice preset or YAML path (default: %(default)s)"
    )
    p.add_argument(
        "--no-voice-prompt",
        action="store_true",
        help="do not ask the model for voices in a system prompt (default: ask)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="Max tokens a new session starts with (default: %(default)s)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument(
        "--db", help="SQLite sessions file (default: sessions.sqlite3 in the user data dir)"
    )
    p.add_argument(
        "--auth",
        metavar="USER:PASS",
        help="require this login (each user sees only their own sessions). A password on the "
        "command line shows in `ps` to every local user: prefer $THOUGHTFORM_AUTH=USER:PASS "
        "or --auth-file (default: no login, or $THOUGHTFORM_AUTH when set)",
    )
    p.add_argument(
        "--auth-file",
        metavar="PATH",
        help="file of USER:PASS lines, one per user; # comments (default: none)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback host without a login (default: refused)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("proxy", help="OpenAI-compatible proxy: voices, steering, recording")
    from .proxy.cli import add_arguments as _proxy_arguments

    _proxy_arguments(p)
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("bench", help="benchmarks (parse, backend, steer, branch, ui, proxy)")
    p.add_argument(
        "what", choices=["parse", "backend", "steer", "branch", "ui", "proxy"], help="which"
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--size-mb", type=float, default=10.0, help="parse: input size in MB")
    p.add_argument(
        "--tokens", type=int, default=0, help="tokens per run, 0 = each bench's own default"
    )
    p.add_argument(
        "--no-transformers", action="store_true", help="backend: skip the transformers runs"
    )
    p.add_argument("--threads", type=int, help="backend bench: decode threads for all runs")
    p.add_argument(
        "--backend",
        choices=["llamacpp", "transformers"],
        default="llamacpp",
        help="branch bench: the backend to branch on (default: llamacpp)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "dataset", help="validate, inspect, convert and synthesise datasets", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("train", help="LoRA fine-tuning and GGUF export", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="voice adherence eval (eval adherence ...)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("council", help="an inner chat: voices take turns", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_council)

    p = sub.add_parser("vectors", help="voice vectors: train, path, list, show", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_vectors)
    _say_defaults(ap)
    return ap


def _say_defaults(ap: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default (one rule for every subcommand's --help)."""
    for sub in ap._actions:
        if not isinstance(sub, argparse._SubParsersAction):
            continue
        for p in sub.choices.values():
            for a in p._actions:
                if isinstance(a, argparse._HelpAction) or a.nargs == argparse.REMAINDER:
                    continue
                h = a.help or ""
                if "default" in h.lower() or a.required or a.default is argparse.SUPPRESS:
                    continue
                d = a.default
                if isinstance(a, argparse._StoreTrueAction):
                    shown = "off"
                elif d is None:
                    shown = "none"
                elif isinstance(d, list | tuple):
                    shown = ", ".join(map(str, d)) or "none"
                else:
                    shown = str(d)
                a.help = f"{h} (default: {shown})".strip()


_DELEGATED: dict[str, Callable[[argparse.Namespace], int]] = {
    "dataset": cmd_dataset,
    "train": cmd_train,
    "eval": cmd_eval,
    "council": cmd_council,
    "vectors": cmd_vectors,
}


def main(argv: Sequence[str] | None = None, stderr: TextIO | None = None) -> int:
    """Entry point: run a subcommand; user mistakes print one line and exit 2."""
    err = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        # These tools own their whole argument syntax (their --help included).
        args = argparse.Namespace(rest=argv[1:], func=_DELEGATED[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        print(f"thoughtform: error: {e}", file=err)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
