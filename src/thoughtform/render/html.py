"""HTML views of a trace: a standalone report (strict CSP, one delegated listener) and an
embeddable fragment (no JS) for Jupyter.

Everything the model wrote (text, voice names, alternatives) is untrusted: it reaches HTML only
through :func:`_esc` / :func:`_attr`, reaches the page's script only inside one JSON blob with
``<``, ``>``, ``&``, U+2028 and U+2029 escaped, and never reaches CSS. Colours reach CSS only
after :func:`~thoughtform.render.safe_color` checked them against ``^#[0-9A-Fa-f]{6}$``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from functools import cache
from importlib import resources

from ..trace import TokenRecord, Trace
from ..voices import VoiceSet
from . import (
    Block,
    build_blocks,
    control_label,
    meta_line,
    prob_bucket,
    safe_color,
    split_controls,
    trace_voices,
    voice_order,
)

__all__ = ["json_blob", "render_fragment", "render_report"]

LABEL_MAX = 80  # characters of a voice name shown in labels; data-voice keeps all of it
ALTS_MAX = 10  # alternatives kept per token

_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_ESC = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


@cache
def _asset(name: str) -> str:
    return (resources.files("thoughtform.render") / "assets" / name).read_text(encoding="utf-8")


def _clean(s: str) -> str:
    # Lone surrogates (from JSON traces) cannot be written as UTF-8.
    return _SURROGATE.sub("\ufffd", s) if _SURROGATE.search(s) else s


def _attr(s: str) -> str:
    """``s`` safe inside a double-quoted attribute; CR kept as a reference so it survives."""
    return html.escape(_clean(s), quote=True).replace("\r", "&#13;")


def _esc(s: str) -> str:
    """``s`` as HTML text, invisible and control characters shown as labelled chips."""
    out: list[str] = []
    for piece, ctrl in split_controls(s):
        if ctrl:
            lab = control_label(piece)
            out.append(f'<span class="tf-cc" title="invisible character {lab}">{lab}</span>')
        else:
            out.append(html.escape(piece, quote=False))
    return "".join(out)


def _short(name: str) -> str:
    return name if len(name) <= LABEL_MAX else name[: LABEL_MAX - 1] + "…"


def _num(x: float | None) -> float | None:
    return round(x, 4) if x is not None and math.isfinite(x) else None


def json_blob(data: object) -> str:
    """JSON text that cannot end or comment out the ``<script>`` element it sits in."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _clean(text).translate(_JSON_ESC)


def _csp_hash(body: str) -> str:
    digest = hashlib.sha256(body.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


class _Palette:
    """Voice name -> class index, plus the ``<style>`` rules that colour each index."""

    def __init__(self, names: list[str], voices: VoiceSet) -> None:
        self.index = {n: i for i, n in enumerate(names)}
        colors = [safe_color(voices.color_of(n)) for n in names]
        # Scope key from the colour list: two fragments on one page with the same key have the
        # same rules, so they can never recolour each other.
        self.key = "tf-k" + hashlib.sha256("|".join(colors).encode()).hexdigest()[:10]
        self.css = "".join(f".{self.key} .tf-v{i}{{--c:{c}}}\n" for i, c in enumerate(colors))

    def cls(self, name: str) -> str:
        return f"tf-v{self.index[name]}"


def _glyph(voices: VoiceSet, name: str) -> str:
    g = voices.voice(name).glyph[:4]
    if g:
        return g
    return "·" if name == voices.default_voice else "•"


def _legend(
    blocks: list[Block], order: list[str], pal: _Palette, voices: VoiceSet, tokens: bool
) -> str:
    nblocks: dict[str, int] = {}
    ntoks: dict[str, int] = {}
    for b in blocks:
        nblocks[b.voice] = nblocks.get(b.voice, 0) + 1
        ntoks[b.voice] = ntoks.get(b.voice, 0) + len(b.tokens)
    items = []
    for name in order:
        n = nblocks[name]
        count = f"{n} block{'s' if n != 1 else ''}"
        if tokens:
            t = ntoks[name]
            count += f", {t} token{'s' if t != 1 else ''}"
        items.append(
            f'<li class="{pal.cls(name)}" data-voice="{_attr(name)}">'
            f'<span class="tf-sw"></span><span class="tf-glyph" aria-hidden="true">'
            f"{_esc(_glyph(voices, name))}</span>"
            f'<span class="tf-name">{_esc(_short(name))}</span>'
            f'<span class="tf-count">{count}</span></li>'
        )
    return '<ul class="tf-legend">' + "".join(items) + "</ul>"


def _title_of(tok: TokenRecord) -> str:
    """Plain-text summary of a token for the fragment's native tooltips (no JS there)."""
    parts = [f"#{tok.index}"]
    b = prob_bucket(tok.logprob)
    if b is not None and tok.logprob is not None:
        parts.append(f"p={math.exp(tok.logprob):.3g}")
    alts = ", ".join(
        f"{a.text!r} {math.exp(a.logprob):.3g}" if a.logprob is not None else f"{a.text!r} ?"
        for a in tok.top[:ALTS_MAX]
    )
    if alts:
        parts.append("alternatives: " + alts)
    return " | ".join(parts)


def _edge_whitespace(block: Block) -> set[int]:
    """Leading/trailing whitespace-only tokens of a block (drawn as ↵ so no blank lines)."""
    out: set[int] = set()
    for seq in (block.tokens, reversed(block.tokens)):
        for t in seq:
            if t.text.strip():
                break
            out.add(t.index)
    return out


def _token_spans(block: Block, titles: bool) -> str:
    edge = _edge_whitespace(block)
    out: list[str] = []
    for t in block.tokens:
        b = prob_bucket(t.logprob)
        cls = "tf-t " + ("tf-pn" if b is None else f"tf-p{b}")
        if t.index in block.marker_tokens:
            cls += " tf-mk"
        text = t.text
        if t.index in edge and "\n" in text:
            cls += " tf-ws"
            text = text.replace("\r", "").replace("\n", "↵")
        lp = "" if t.logprob is None or not math.isfinite(t.logprob) else f"{t.logprob:.6g}"
        title = f' title="{_attr(_title_of(t))}"' if titles else ""
        out.append(
            f'<span class="{cls}" data-token-index="{t.index}" data-logprob="{lp}"{title}>'
            f"{_esc(text)}</span>"
        )
    return "".join(out)


def _blocks_html(
    blocks: list[Block], pal: _Palette, voices: VoiceSet, tokens: bool, titles: bool
) -> str:
    out: list[str] = []
    for b in blocks:
        name = b.voice
        short = _short(name)
        full = f' title="{_attr(name)}"' if short != name else ""
        body = _token_spans(b, titles) if tokens else _esc(b.text)
        out.append(
            f'<details class="tf-block {pal.cls(name)}" data-voice="{_attr(name)}" open>'
            f'<summary{full}><span class="tf-glyph" aria-hidden="true">{_esc(_glyph(voices, name))}'
            f'</span> <span class="tf-name">{_esc(short)}</span></summary>'
            f'<div class="tf-body">{body}</div></details>\n'
        )
    return "".join(out)


def _prepare(
    trace: Trace, voices: VoiceSet | str | None, tokens: bool
) -> tuple[VoiceSet, list[Block], list[str], _Palette, bool]:
    vs = trace_voices(trace, voices)
    tokens = bool(tokens and trace.tokens)
    blocks = build_blocks(trace, vs, tokens=tokens)
    order = voice_order(blocks, vs)
    return vs, blocks, order, _Palette(order, vs), tokens


def render_fragment(
    trace: Trace, voices: VoiceSet | str | None = None, tokens: bool = False
) -> str:
    """An embeddable HTML fragment (Jupyter): legend and voice blocks, styles scoped under
    ``.tf-root``, no script; in token mode native tooltips list the alternatives."""
    vs, blocks, order, pal, tokens = _prepare(trace, voices, tokens)
    style = _asset("tf.css") + pal.css
    return (
        f'<div class="tf-root {pal.key}"><style>{style}</style>'
        f"{_legend(blocks, order, pal, vs, tokens)}\n"
        f"{_blocks_html(blocks, pal, vs, tokens, titles=True)}</div>"
    )


def _token_data(trace: Trace) -> dict[str, object]:
    # Surrogates are cleaned once over the whole JSON text in json_blob.
    return {
        "v": 1,
        "tokens": [
            [
                t.text,
                _num(t.logprob),
                _num(t.entropy),
                [[a.text, _num(a.logprob)] for a in t.top[:ALTS_MAX]],
            ]
            for t in trace.tokens
        ],
    }


def render_report(
    trace: Trace,
    voices: VoiceSet | str | None = None,
    tokens: bool = False,
    title: str | None = None,
) -> str:
    """A complete, offline HTML document with a strict Content-Security-Policy: header, legend,
    collapsible voice blocks, and in token mode shaded tokens with an alternatives popover."""
    vs, blocks, order, pal, tokens = _prepare(trace, voices, tokens)
    if title is None:
        t = trace.meta.get("title")
        title = t if isinstance(t, str) and t else "thoughtform report"
    style = _asset("tf.css") + _asset("report.css") + pal.css
    script = _asset("report.js") if tokens else ""
    script_src = _csp_hash(script) if script else "'none'"
    csp = (
        "default-src 'none'; "
        f"style-src {_csp_hash(style)}; "
        f"script-src {script_src}; "
        "img-src 'none'; font-src 'none'; connect-src 'none'; media-src 'none'; "
        "object-src 'none'; frame-src 'none'; base-uri 'none'; form-action 'none'"
    )
    facts = "".join(
        f'<li><span class="tf-fk">{_esc(k)}</span> {_esc(v)}</li>' for k, v in meta_line(trace)
    )
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n',
        '<meta name="referrer" content="no-referrer">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>{html.escape(_clean(title), quote=False)}</title>\n",
        f"<style>{style}</style>\n</head>\n<body>\n",
        f'<div id="tf-root" class="tf-root {pal.key}">\n',
        f'<header><h1>{_esc(title)}</h1><ul class="tf-meta">{facts}</ul></header>\n',
        _legend(blocks, order, pal, vs, tokens),
        "\n<main>\n",
        _blocks_html(blocks, pal, vs, tokens, titles=False),
        "</main>\n",
    ]
    if tokens:
        parts += [
            '<div id="tf-pop" class="tf-pop" role="tooltip" hidden></div>\n',
            f'<script type="application/json" id="tf-data">{json_blob(_token_data(trace))}</script>\n',
            f"<script>{script}</script>\n",
        ]
    parts.append("</div>\n</body>\n</html>\n")
    return "".join(parts)
