import argparse
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import openglm
from openglm.data import prepare as prepare_module
from openglm.data.prepare import is_val, prepare
from openglm.data.shards import TokenShards
from openglm.data.tokenizer import load_tokenizer, train_tokenizer
from openglm.errors import OpenGLMError

ZH = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "语言模型可以生成中文和英文。"]
EN = ["The quick brown fox jumps over the lazy dog.", "Language models fill in blanks.", "It is a truth."]


def docs(n: int) -> list[tuple[str, str]]:
    """``n`` distinct (text, lang) documents of varied length."""
    out = []
    for i in range(n):
        zh = i % 3 == 0
        base = (ZH if zh else EN)[i % 3]
        out.append((f"{i}: " + " ".join([base] * (1 + i % 5)), "zh" if zh else "en"))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(ZH + EN, vocab_size=300, min_frequency=1).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def write_jsonl(path: Path, documents, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for text, lang in documents:
            f.write(json.dumps({"text": text, "lang": lang, "src": "x"}, ensure_ascii=False) + "\n")
    return path


def write_txt(path: Path, documents, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(t for t, _ in documents) + "\n\n")  # a trailing blank line is no document
    return path


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_formats_round_trip_to_exact_tokens(tmp_path, tok_dir, tok):
    a, b, c, d = docs(40)[:10], docs(40)[10:20], docs(40)[20:30], docs(40)[30:]
    inputs = [
        write_txt(tmp_path / "a.txt", a),
        write_jsonl(tmp_path / "b.jsonl", b),
        write_jsonl(tmp_path / "c.jsonl.xz", c, lzma.open),
        write_txt(tmp_path / "d.txt.gz", d, gzip.open),
    ]
    result = prepare(inputs, tok_dir, tmp_path / "out", shard_tokens=150, workers=1)
    assert not result.already_complete
    shards = TokenShards(tmp_path / "out")
    expected = a + b + c + d
    assert shards.num_documents == len(expected)
    for i, (text, lang) in enumerate(expected):
        assert shards.document(i).tolist() == tok.encode(text)
        assert shards.lang(i) == (lang if inputs[i // 10].name.startswith(("b", "c")) else "")
    assert [x.tolist() for x in shards.documents()] == [tok.encode(t) for t, _ in expected]
    assert len(shards) == result.new_tokens == sum(len(tok.encode(t)) for t, _ in expected)

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    assert split["complete"] and manifest["dtype"] == "uint32" and not manifest["eos_between_documents"]
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size
    assert load_tokenizer(tmp_path / "out" / "tokenizer").encode(EN[0]) == tok.encode(EN[0])
    # Every shard but the last is full up to one more document; none is cut.
    assert len(split["shards"]) > 3
    for shard in split["shards"]:
        assert shard["tokens"] <= 150
    assert sum(s["documents"] for s in split["shards"]) == len(expected)


def test_doc_per_file(tmp_path, tok_dir, tok):
    texts = ["first line\nsecond line\n", "另一个文件\n\n第二段\n"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    prepare(paths, tok_dir, tmp_path / "out", doc_per_file=True, workers=1)
    shards = TokenShards(tmp_path / "out")
    assert [d.tolist() for d in shards.documents()] == [tok.encode(t) for t in texts]


def test_val_split_is_deterministic_by_text(tmp_path, tok_dir, tok):
    corpus = docs(200)
    path = write_jsonl(tmp_path / "c.jsonl", corpus)
    prepare([path], tok_dir, tmp_path / "a", val_fraction=0.25, shard_tokens=300, workers=1)
    prepare([path], tok_dir, tmp_path / "b", val_fraction=0.25, shard_tokens=10_000, workers=1)
    for split in ("train", "val"):
        want = [tok.encode(t) for t, _ in corpus if is_val(t, 0.25) == (split == "val")]
        for out in ("a", "b"):
            assert [d.tolist() for d in TokenShards(tmp_path / out, split).documents()] == want
    n_val = TokenShards(tmp_path / "a", "val").num_documents
    assert 25 < n_val < 75


def test_workers_give_identical_output(tmp_path, tok_dir, monkeypatch):
    # Many small chunks, so that results come back from both workers and must be put in order.
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 300)
    path = write_jsonl(tmp_path / "c.jsonl.xz", docs(300), lzma.open)
    prepare([path], tok_dir, tmp_path / "w1", val_fraction=0.1, shard_tokens=500, workers=1)
    prepare([path], tok_dir, tmp_path / "w2", val_fraction=0.1, shard_tokens=500, workers=2)
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "c.jsonl", docs(1000))
    args = ["--input", str(path), "--tokenizer", str(tok_dir), "--val-fraction", "0.1", "--shard-tokens", "400"]
    args += ["--workers", "1"]
    out = tmp_path / "out"
    code = (
        "import argparse, sys; from openglm.data import prepare as m; p = argparse.ArgumentParser(); "
        "m.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(openglm.__file__).parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "data", "prepare", *args, "-o", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    manifest_path = out / "manifest.json"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if manifest_path.is_file() and len(json.loads(manifest_path.read_text())["splits"]["train"]["shards"]) >= 2:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    manifest = json.loads(manifest_path.read_text())
    assert not manifest["splits"]["train"]["complete"]
    done = len(manifest["splits"]["train"]["shards"])
    # What a kill during a shard write leaves behind: files the manifest does not list.
    (out / "train" / f"{done:05d}.bin").write_bytes(b"partial")
    (out / "train" / f".{done:05d}.idx.123.tmp").write_bytes(b"partial")
    (out / ".manifest.json.456.tmp").write_bytes(b'{"format"')

    resumed = prepare([path], tok_dir, out, val_fraction=0.1, shard_tokens=400, workers=1)
    fresh = prepare([path], tok_dir, tmp_path / "fresh", val_fraction=0.1, shard_tokens=400, workers=1)
    assert 0 < resumed.new_tokens < fresh.new_tokens
    assert not (out / ".manifest.json.456.tmp").exists()
    assert tree(out) == tree(tmp_path / "fresh")
    again = prepare([path], tok_dir, out, val_fraction=0.1, shard_tokens=400, workers=1)
    assert again.already_complete and again.new_tokens == 0


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare_module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_splits_into_one_directory_and_no_op(tmp_path, tok_dir, tok, capsys):
    train = write_txt(tmp_path / "train.txt", docs(30))
    val = write_jsonl(tmp_path / "val.jsonl.gz", docs(5), gzip.open)
    out = str(tmp_path / "out")
    common = ["data", "prepare", "--tokenizer", str(tok_dir), "-o", out, "--workers", "1"]
    assert run_cli([*common, "--input", str(train)]) == 0
    assert run_cli([*common, "--input", str(val), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "train: 30 documents" in printed and "val: 5 documents" in printed and "tokens/s" in printed
    assert run_cli([*common, "--input", str(val), "--split", "val"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert TokenShards(out, "val").document(4).tolist() == tok.encode(docs(5)[4][0])
    with pytest.raises(OpenGLMError, match="other inputs or settings"):
        run_cli([*common, "--input", str(val), "--split", "train"])


def test_errors_name_file_and_line(tmp_path, tok_dir):
    def fails(name: str, content: bytes, match: str):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(OpenGLMError, match=match):
            prepare([path], tok_dir, tmp_path / f"out-{name}", workers=1)

    fails("bad.txt", b"fine\nalso fine\nbad \xff byte\n", r"bad\.txt:3: invalid UTF-8")
    fails("bad.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', r"bad\.jsonl:3: invalid JSON")
    fails("notext.jsonl", b'{"text": "a"}\n{"content": "b"}\n', r'notext\.jsonl:2: no string "text" field')
    fails("empty.jsonl", b"\n\n", r"empty\.jsonl: no documents")
    fails("broken.txt.xz", b"not xz at all", r"broken\.txt\.xz: cannot read")
    with pytest.raises(OpenGLMError, match="no input file at .*missing.txt"):
        prepare([tmp_path / "missing.txt"], tok_dir, tmp_path / "out", workers=1)


def test_shuffled_order_is_deterministic_and_resumable(tmp_path, tok_dir):
    prepare([write_txt(tmp_path / "a.txt", docs(50))], tok_dir, tmp_path / "out", shard_tokens=100, workers=1)
    shards = TokenShards(tmp_path / "out")
    epoch = [d.tolist() for d in shards.iter_documents(seed=7)]
    assert epoch == [d.tolist() for d in shards.iter_documents(seed=7)]
    assert epoch[20:] == [d.tolist() for d in shards.iter_documents(seed=7, start=20)]
    in_order = [d.tolist() for d in shards.documents()]
    assert epoch != in_order and sorted(epoch) == sorted(in_order)
    assert epoch != [d.tolist() for d in shards.iter_documents(seed=8)]


def test_shards_refuse_incomplete_or_corrupt(tmp_path, tok_dir):
    prepare([write_txt(tmp_path / "a.txt", docs(20))], tok_dir, tmp_path / "out", shard_tokens=100, workers=1)
    with pytest.raises(OpenGLMError, match="no split 'val'"):
        TokenShards(tmp_path / "out", "val")
    bin_path = tmp_path / "out" / "train" / "00001.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(OpenGLMError, match="00001.bin is missing or has the wrong size"):
        TokenShards(tmp_path / "out")


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_their_parent(tmp_path, tok_dir, sig):
    path = write_jsonl(tmp_path / "c.jsonl", docs(3000) * 60)
    env = dict(os.environ, PYTHONPATH=str(Path(openglm.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "openglm", "data", "prepare", "--input", str(path), "--tokenizer",
                             str(tok_dir), "--workers", "2", "-o", str(tmp_path / "out")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers = []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        # spawn's resource tracker is a child too; the workers are the ones running the pool
        workers = [p for p in _children(proc.pid) if b"spawn_main" in _cmdline(p)]
        time.sleep(0.05)
    assert len(workers) == 2, "the workers did not start"
    time.sleep(1.0)  # let them take work
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)  # workers left alive would hold stderr open
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "Traceback" not in err, err
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "workers outlived their parent"


def test_a_run_failing_before_its_first_shard_leaves_no_directory(tmp_path, tok_dir):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(OpenGLMError, match="c.jsonl:2"):
        prepare([path], tok_dir, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()  # no half manifest blocking the rerun with the fixed file
    path.write_text(json.dumps({"text": "fine"}) + "\n")
    assert prepare([path], tok_dir, tmp_path / "out", workers=1).manifest["splits"]["train"]["documents"] == 1
