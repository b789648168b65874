"""Rendering without a browser: golden HTML fragment and terminal output, token mode structure,
escaping of hostile text and voice names, CSP hashes, live terminal streaming."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from thoughtform.backends.base import GenerationRequest, Sampling
from thoughtform.backends.replay import ReplayBackend
from thoughtform.generate import Generation
from thoughtform.parse import Segment, VoiceParser
from thoughtform.render import (
    build_blocks,
    prob_bucket,
    safe_color,
    split_controls,
    trace_from_text,
    trace_voices,
)
from thoughtform.render.html import json_blob, render_fragment, render_report
from thoughtform.render.terminal import LiveRenderer, render_terminal
from thoughtform.trace import Alternative, TokenRecord, Trace, parse_trace_lines
from thoughtform.voices import PRESETS, Voice, VoiceSet

FIX = Path(__file__).parent / "fixtures" / "render"
UPDATE = os.environ.get("TF_UPDATE_GOLDEN") == "1"
TRANSCRIPT = (FIX / "transcript.txt").read_text(encoding="utf-8")


def golden(name: str, actual: str) -> None:
    """Compare with a golden file (``TF_UPDATE_GOLDEN=1`` rewrites it)."""
    path = FIX / name
    if UPDATE:
        path.write_bytes(actual.encode("utf-8"))
    assert actual == path.read_bytes().decode("utf-8")


class Tree(HTMLParser):
    """Elements in document order as (tag, attrs), their own text, and where each subtree ends."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[int] = []
        self.text: dict[int, list[str]] = {}
        self.ends: dict[int, int] = {}
        self.chunks: list[tuple[int, str]] = []  # (owning element, text) in document order

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "link", "img"):
            self.stack.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.ends[self.stack.pop()] = len(self.elements)

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.text.setdefault(self.stack[-1], []).append(data)
            self.chunks.append((self.stack[-1], data))

    def find(self, pred: Callable[[str, dict[str, str | None]], bool]) -> list[int]:
        """Indices of elements matching ``pred(tag, attrs)``."""
        return [i for i, (t, a) in enumerate(self.elements) if pred(t, a)]

    def inner_text(self, i: int) -> str:
        """Text of element ``i`` and its descendants."""
        return "".join(d for k, d in self.chunks if i <= k < self.ends[i])


def parse_html(doc: str) -> Tree:
    """Parse an HTML document or fragment."""
    t = Tree()
    t.feed(doc)
    t.close()
    return t


def token_trace(
    pieces: list[str], voices: VoiceSet | str = "seed", logprobs: list[float | None] | None = None
) -> Trace:
    """A real generation trace: tokens replayed through the Generation pipeline."""
    lps = logprobs or [-0.05 - 0.7 * (i % 7) for i in range(len(pieces))]
    src = Trace(
        tokens=[
            TokenRecord(
                i,
                p,
                logprob=lps[i],
                top=[Alternative(p, lps[i]), Alternative(f"alt<{i}>", -2.5), Alternative("", -4.0)],
            )
            for i, p in enumerate(pieces)
        ]
    )
    gen = Generation(
        ReplayBackend(trace=src), GenerationRequest(sampling=Sampling(max_tokens=0)), voices
    )
    return gen.run()


PIECES = [
    "Hi", " there", ".\n", "[", "Echo", "]", " there", ",", " there", ".\n", "[Doubt", "]:",
    " sure", "?", "\n", "[/", "Doubt]", "\n", "[Echo]", "\n", "[Echo]", " again", "\n", "ok",
]  # fmt: skip


# -- transcripts ------------------------------------------------------------------------------


def test_trace_from_text_segments_and_meta() -> None:
    t = trace_from_text(TRANSCRIPT, "seed")
    assert t.source_text == TRANSCRIPT
    assert t.meta["kind"] == "transcript" and t.meta["voices"] == "seed"
    assert [(s.voice, s.text) for s in t.segments if s.text] == [
        ("main", "The lamp is on."),
        ("Echo", "on, the lamp is on."),
        ("Doubt", "is it <b>really</b> on & bright?"),
        ("Wonder", 'what if "it" were off?'),
        ("Pulse", "a breath.\nback to the room."),
    ]
    # The saved voice set comes back when rendering without one.
    assert trace_voices(t).to_dict() == PRESETS["seed"].to_dict()


def test_fragment_golden() -> None:
    golden("fragment.html", render_fragment(trace_from_text(TRANSCRIPT, "seed")))


def test_fragment_structure() -> None:
    vs = PRESETS["seed"]
    doc = render_fragment(trace_from_text(TRANSCRIPT, vs), vs)
    tree = parse_html(doc)
    blocks = tree.find(lambda t, a: t == "details")
    assert [tree.elements[i][1]["data-voice"] for i in blocks] == [
        "main", "Echo", "Doubt", "Wonder", "Pulse",
    ]  # fmt: skip
    assert all("open" in tree.elements[i][1] for i in blocks)  # collapsible, shown open
    bodies = tree.find(lambda t, a: a.get("class") == "tf-body")
    assert tree.inner_text(bodies[2]) == "is it <b>really</b> on & bright?"
    assert "<b>" not in doc and "&lt;b&gt;really&lt;/b&gt; on &amp; bright?" in doc
    # Label and glyph from the voice set; a lenient unknown voice gets a bullet.
    summaries = tree.find(lambda t, a: t == "summary")
    assert tree.inner_text(summaries[1]) == "◎ Echo"
    assert tree.inner_text(summaries[3]) == "• Wonder"
    # Legend: voices in lane order with counts (empty Echo and blank main segments not counted).
    legend = tree.find(lambda t, a: t == "li")
    assert [tree.elements[i][1]["data-voice"] for i in legend] == [
        "main", "Echo", "Pulse", "Doubt", "Wonder",
    ]  # fmt: skip
    assert [tree.inner_text(i) for i in legend][:2] == ["·main1 block", "◎Echo1 block"]
    # Colours come from the voice set, through one scoped rule per voice class.
    css = "".join(tree.text[tree.find(lambda t, a: t == "style")[0]])
    key = tree.elements[0][1]["class"].split()[1]  # type: ignore[union-attr]
    echo_cls = tree.elements[blocks[1]][1]["class"].split()[1]  # type: ignore[union-attr]
    assert f".{key} .{echo_cls}{{--c:{vs.color_of('Echo')}}}" in css
    assert not tree.find(lambda t, a: t == "script")
    assert all(not k.startswith("on") and k != "style" for _, a in tree.elements for k in a)


def test_fragments_with_different_colours_do_not_collide() -> None:
    a = render_fragment(trace_from_text("[Echo] x\n", "seed"), "seed")
    other = VoiceSet("o", (Voice("Echo", color="#123456"),))
    b = render_fragment(trace_from_text("[Echo] x\n", other), other)
    key = re.compile(r'class="tf-root (tf-k[0-9a-f]{10})"')
    ka, kb = key.search(a).group(1), key.search(b).group(1)  # type: ignore[union-attr]
    assert ka != kb and f".{kb} .tf-v0{{--c:#123456}}" in b


def test_invalid_colour_never_reaches_css() -> None:
    evil = "red;}body{background:url(http://x/)}"
    # A VoiceSet built in code skips file validation; the renderer must still refuse it.
    vs = VoiceSet("evil", (Voice("Echo", color=evil),))
    doc = render_report(trace_from_text("[Echo] hi\n", vs), vs)
    assert "url(" not in doc and "background:url" not in doc
    assert safe_color(evil) == "#777777" and safe_color("#abcdef") == "#ABCDEF"


def test_terminal_golden() -> None:
    con = Console(record=True, width=80, color_system="truecolor", file=io.StringIO())
    render_terminal(trace_from_text(TRANSCRIPT, "seed"), "seed", con)
    golden("terminal.txt", con.export_text(clear=False))
    golden("terminal.ansi", con.export_text(styles=True))


def test_terminal_prints_model_text_literally() -> None:
    text = "[Echo] [bold red]x[/] :smile: \x1b[2J\x1b]0;pwned\x07 \u202eabc\x9b31m\n"
    con = Console(file=io.StringIO(), width=200, color_system="truecolor", force_terminal=True)
    render_terminal(trace_from_text(text, "seed"), "seed", con)
    out = con.file.getvalue()  # type: ignore[attr-defined]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)  # rich's own SGR colour codes
    assert "[bold red]x[/] :smile:" in plain  # no markup, no emoji codes
    assert "\x1b" not in plain and "\x07" not in plain and "\u202e" not in out and "\x9b" not in out
    assert "⟨U+001B⟩[2J⟨U+001B⟩]0;pwned⟨U+0007⟩ ⟨U+202E⟩abc⟨U+009B⟩31m" in plain


def test_terminal_tokens_golden() -> None:
    tr = token_trace(PIECES)
    con = Console(record=True, width=80, color_system="truecolor", file=io.StringIO())
    render_terminal(tr, "seed", con, tokens=True)
    text = con.export_text(clear=False)
    assert text == (
        "[main]\nHi there.\n\n[Echo] ◎\n[Echo] there, there.\n\n"
        "[Doubt] ?\n[Doubt]: sure?\n[/Doubt]\n\n[Echo] ◎\n[Echo] again\nok\n"
    )
    golden("terminal_tokens.ansi", con.export_text(styles=True))


def test_terminal_hostile_voice_names() -> None:
    tr = token_trace(["a", " b"])
    names = ["[bold red]x[/]", "N" * 10_000]
    tr.tokens[0].voice, tr.tokens[1].voice = names
    con = Console(record=True, width=100, color_system="truecolor", file=io.StringIO())
    render_terminal(tr, "seed", con, tokens=True)
    assert con.export_text() == "[[bold red]x[/]]\na\n\n[" + "N" * 79 + "…]\n b\n"


def test_empty_and_damaged_traces_render() -> None:
    empty = Trace()
    assert '<ul class="tf-legend"></ul>' in render_report(empty, tokens=True)
    assert "<details" not in render_fragment(empty)
    damaged = Trace(meta={"voice_set": {"voices": [{"name": 5}]}, "voices": "think"})
    damaged.source_text = "<think>hm</think>ok"
    assert [
        a["data-voice"] for t, a in parse_html(render_fragment(damaged)).elements if t == "details"
    ] == [
        "think",
        "main",
    ]
    con = Console(record=True, width=80, file=io.StringIO())
    render_terminal(empty, None, con, tokens=True)
    assert con.export_text() == ""


def _live(text: str, chunk: int) -> str:
    con = Console(record=True, width=80, color_system="truecolor", file=io.StringIO())
    live = LiveRenderer(con, "seed")
    parser = VoiceParser("seed")
    for i in range(0, len(text), chunk):
        live.on_events(parser.feed(text[i : i + chunk]))
    live.on_events(parser.close())
    live.close()
    return con.export_text()


def test_live_renderer_matches_whole_render() -> None:
    expected = (FIX / "terminal.txt").read_text(encoding="utf-8")
    for chunk in (1, 2, 5, 1000):
        assert _live(TRANSCRIPT, chunk) == expected


@settings(max_examples=40, deadline=None)
# A word longer than the width: the whole render folded it where the live one let it run.
@example("a" * 22 + "[Echo]" * 4 + "[/Echo]" * 5, 1)
@given(
    st.lists(st.sampled_from([*"ab \n[]/:<>", "[Echo]", "[/Echo]", "[Doubt]"]), max_size=40).map(
        "".join
    ),
    st.integers(1, 7),
)
def test_live_renderer_property(text: str, chunk: int) -> None:
    """Live output never depends on how the stream was cut, and equals the whole render."""
    con = Console(record=True, width=80, color_system=None, file=io.StringIO())
    render_terminal(trace_from_text(text, "seed"), "seed", con)
    whole = con.export_text()
    assert _live(text, chunk) == _live(text, 1000) == whole


# -- token mode -------------------------------------------------------------------------------


def test_token_blocks_follow_voices_and_markers() -> None:
    tr = token_trace(PIECES)
    blocks = build_blocks(tr, trace_voices(tr), tokens=True)
    assert [(b.voice, "".join(t.text for t in b.tokens)) for b in blocks] == [
        ("main", "Hi there.\n"),
        ("Echo", "[Echo] there, there.\n"),
        ("Doubt", "[Doubt]: sure?\n[/Doubt]"),
        ("Echo", "[Echo] again\nok"),  # the blank "[Echo]\n" block before it is hidden
    ]
    assert [sorted(b.marker_tokens) for b in blocks] == [[], [3, 4, 5], [10, 11, 15, 16], [20]]


def test_token_report_structure() -> None:
    tr = token_trace(PIECES)
    doc = render_report(tr, "seed", tokens=True, title="t")
    tree = parse_html(doc)
    spans = tree.find(lambda t, a: "data-token-index" in a)
    idx = [int(tree.elements[i][1]["data-token-index"]) for i in spans]  # type: ignore[arg-type]
    assert idx == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 21, 22, 23]
    for i, k in zip(spans, idx, strict=True):
        a = tree.elements[i][1]
        assert float(a["data-logprob"]) == pytest.approx(tr.tokens[k].logprob, abs=1e-5)  # type: ignore[arg-type]
        assert f"tf-p{prob_bucket(tr.tokens[k].logprob)}" in a["class"]  # type: ignore[operator]
        assert ("tf-mk" in a["class"]) == (k in (3, 4, 5, 10, 11, 15, 16, 20))  # type: ignore[operator]
    # Every token sits in the block of its own voice.
    for b in tree.find(lambda t, a: t == "details"):
        voice = tree.elements[b][1]["data-voice"]
        inside = [k for i, k in zip(spans, idx, strict=True) if b < i < tree.ends[b]]
        assert inside and all(tr.tokens[k].voice == voice for k in inside)
    # One JSON blob with every token's alternatives, and exactly one executable script.
    scripts = tree.find(lambda t, a: t == "script")
    assert [tree.elements[i][1].get("type") for i in scripts] == ["application/json", None]
    data = json.loads("".join(tree.text[scripts[0]]))
    assert len(data["tokens"]) == len(tr.tokens)
    assert data["tokens"][5] == [
        "]",
        pytest.approx(-0.05 - 3.5),
        None,
        [["]", pytest.approx(-3.55)], ["alt<5>", -2.5], ["", -4.0]],
    ]
    # Legend counts tokens in shown blocks.
    legend = [tree.inner_text(i) for i in tree.find(lambda t, a: t == "li" and "data-voice" in a)]
    assert legend == [
        "·main1 block, 3 tokens",
        "◎Echo2 blocks, 11 tokens",
        "?Doubt1 block, 7 tokens",
    ]


def test_token_fragment_has_native_tooltips() -> None:
    tr = token_trace(PIECES)
    tree = parse_html(render_fragment(tr, "seed", tokens=True))
    span = tree.elements[tree.find(lambda t, a: a.get("data-token-index") == "6")[0]][1]
    assert (
        span["title"] == "#6 | p=0.0143 | alternatives: ' there' 0.0143, 'alt<6>' 0.0821, '' 0.0183"
    )
    assert not tree.find(lambda t, a: t == "script")


def test_tokens_without_recorded_voices_are_reparsed() -> None:
    tr = token_trace(PIECES)
    bare = Trace(
        meta={"voices": "seed"},
        tokens=[TokenRecord(t.index, t.text, logprob=t.logprob) for t in tr.tokens],
    )
    vs = trace_voices(tr)
    got = [(b.voice, [t.index for t in b.tokens]) for b in build_blocks(bare, vs, tokens=True)]
    want = [(b.voice, [t.index for t in b.tokens]) for b in build_blocks(tr, vs, tokens=True)]
    assert got == want


def test_unknown_and_nan_logprobs() -> None:
    assert prob_bucket(None) is None and prob_bucket(float("nan")) is None
    assert prob_bucket(float("-inf")) is None
    assert [prob_bucket(x) for x in (0.0, -0.2, -0.6, -1.5, -3.0, -9.0, 0.5)] == [
        0,
        1,
        2,
        3,
        4,
        5,
        0,
    ]
    tr = token_trace(["a", " b"], logprobs=[None, -0.1])
    doc = render_report(tr, "seed", tokens=True)
    assert 'class="tf-t tf-pn" data-token-index="0" data-logprob=""' in doc


def test_transcript_in_token_mode_falls_back_to_text() -> None:
    doc = render_report(trace_from_text(TRANSCRIPT, "seed"), "seed", tokens=True)
    assert "data-token-index" not in doc and "<script" not in doc
    assert "script-src 'none'" in doc


def test_trace_file_roundtrip_renders_the_same() -> None:
    tr = token_trace(PIECES)
    back = parse_trace_lines(tr.to_jsonl().splitlines(), "<t>")
    assert render_report(back, tokens=True, title="x") == render_report(
        tr, "seed", tokens=True, title="x"
    )


# -- escaping, CSP ----------------------------------------------------------------------------

HOSTILE_NAMES = [
    "Q\"uote's <b>x</b> & tf-block",
    "tf-v0 tf-root",
    "N" * 10_000,
    "bi\u202edi \u2028 \r\n cr",
]


def hostile_trace() -> Trace:
    pieces = [
        "<scr", "ipt>window.__pwned=1</script>", "\n", "[Echo] ", "<img src=x onerror=alert(1)>",
        '"><svg onload=alert(2)>', "\n", "[Doubt]: <a href=\"javascript:alert(3)\">x</a>",
        "<style>body{position:fixed}</style>&lt;b&gt;", "\u2028\u2029\x00\u202e\ufeff\ud83d", "\n",
    ]  # fmt: skip
    tr = token_trace(pieces)
    for t in tr.tokens:
        t.top.append(Alternative("</script><script>window.__pwned=2</script>\u2028", -6.0))
    # Voices from a hand-written trace file are arbitrary strings.
    for i, name in enumerate(HOSTILE_NAMES):
        tr.segments.append(Segment(name, f"<i>{i}</i>", 0, 0))
    return tr


def test_hostile_names_and_text_are_escaped() -> None:
    tr = hostile_trace()
    for doc in (render_report(tr, "seed"), render_fragment(tr, "seed")):
        tree = parse_html(doc)
        assert {t for t, _ in tree.elements} <= {
            "html", "head", "meta", "title", "style", "body", "div", "header", "h1", "ul", "li",
            "b", "span", "main", "details", "summary", "script",
        }  # fmt: skip
        assert all(not k.startswith("on") and k != "style" for _, a in tree.elements for k in a)
        names = [a["data-voice"] for t, a in tree.elements if t == "details"]
        # html.parser normalises nothing in attributes: CR survives as &#13;.
        assert names[-4:] == HOSTILE_NAMES
        assert "<img" not in doc and "<svg" not in doc and "<a " not in doc
        long_label = [tree.inner_text(i) for i in tree.find(lambda t, a: t == "summary")][-2]
        assert long_label.endswith("N…") and len(long_label) < 100
        assert "\u202e" not in "".join("".join(v) for v in tree.text.values())  # shown as chips


def test_json_blob_cannot_break_out() -> None:
    payload = {"a": "</script><!-- <script> & \u2028\u2029 \ud800", "b": [None, 1.5]}
    blob = json_blob(payload)
    assert not set(blob) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(blob) == {
        "a": "</script><!-- <script> & \u2028\u2029 \ufffd",
        "b": [None, 1.5],
    }
    tr = hostile_trace()
    doc = render_report(tr, "seed", tokens=True)
    doc.encode("utf-8")  # no lone surrogates left
    assert '<span class="tf-cc" title="invisible character U+D83D">U+D83D</span>' in doc
    render_fragment(tr, "seed", tokens=True).encode("utf-8")
    assert doc.count("<script") == 2 and doc.count("</script>") == 2


def test_csp_hashes_match_inline_blocks() -> None:
    doc = render_report(token_trace(PIECES), "seed", tokens=True)
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', doc)
    assert csp is not None
    policy = dict(d.strip().split(" ", 1) for d in csp.group(1).split(";"))
    assert policy["default-src"] == "'none'" and "unsafe" not in csp.group(1)

    def h(body: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    style = re.search(r"<style>(.*?)</style>", doc, re.S).group(1)  # type: ignore[union-attr]
    script = re.search(r"<script>(.*?)</script>", doc, re.S).group(1)  # type: ignore[union-attr]
    assert policy["style-src"] == h(style) and policy["script-src"] == h(script)
    assert doc.index("Content-Security-Policy") < doc.index("<style>")
    assert "http://" not in doc and "https://" not in doc  # nothing to fetch


def test_split_controls() -> None:
    assert split_controls("a\r\nb\rc\x00\u202e") == [
        ("a", False), ("\nb", False), ("\r", True), ("c", False), ("\x00", True), ("\u202e", True),
    ]  # fmt: skip
    assert split_controls("plain\ttext\n") == [("plain\ttext\n", False)]
