"""``openglm data prepare``: tokenize a text corpus into memory-mapped token shards.

Inputs, streamed (a corpus larger than memory is fine), each optionally ``.gz`` or ``.xz`` compressed:

- ``*.jsonl``: one JSON object a line with a string ``"text"``; an optional string ``"lang"`` is kept
  as a per-document tag (for per-language perplexity). Blank lines are skipped.
- anything else is plain text: one document a line (blank lines skipped), or with ``doc_per_file``
  the whole file is one document.

Output directory::

    manifest.json       settings, tokenizer hash, the splits with their shards, progress
    tokenizer/          the tokenizer the shards were made with
    train/00000.bin     uint32 token ids of whole documents, back to back
    train/00000.idx     int64 [documents + 1] token offsets: document i is bin[idx[i]:idx[i+1]]
    train/00000.lang    uint16 [documents] index into manifest["langs"] ("" = untagged)
    val/...

No EOS token is inserted between documents: the boundaries live in the ``.idx`` files, and the
training loop decides how documents are joined. A document is never cut across shards: a shard is
closed before the document that would take it past ``shard_tokens`` (a longer document gets a shard
of its own).

Splits: with ``val_fraction`` each document goes to ``val`` when a hash of its text falls below that
fraction, else to ``train`` (the same text always lands in the same split, whatever the run), or
``split`` names the one split that receives every document. Several runs with different ``split``
names may write into one directory (e.g. ``train`` from one file, ``val`` from another).

Resuming: the manifest is rewritten after every shard, recording for each split the shards done and
the index (in input order) of the next document not yet in one. Re-running the same command reads
the input again, skips the documents already written, discards uncommitted shard files and
continues; the result is byte-identical to an uninterrupted run, and so is the result for any number
of workers. A completed prepare is a no-op.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from ..errors import OpenGLMError
from ..utils import atomic_write_bytes, atomic_write_text, check_writable

DEFAULT_SHARD_TOKENS = 16 * 2**20
FORMAT = "openglm-token-shards"
FORMAT_VERSION = 1
# Documents are sent to the workers in chunks of about this many characters: big enough to amortise
# the inter-process transfer, small enough to keep every worker busy and memory bounded.
CHUNK_CHARS = 2**18
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class PrepareResult:
    manifest: dict
    new_tokens: int  # tokens written by this run (0 when it found the work already done)
    seconds: float
    already_complete: bool


def read_documents(path: str | Path, doc_per_file: bool = False, bar=None) -> Iterator[tuple[str, str]]:
    """Stream ``(text, lang)`` for each document of ``path`` (``lang`` is ``""`` when untagged).

    Raises ``OpenGLMError`` naming the file and line for invalid UTF-8, invalid JSON, a JSONL line
    without a string ``"text"``, and a file without documents. ``bar`` (a ``tqdm``) counts bytes read.
    """
    path = Path(path)
    suffixes = path.suffixes
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(suffixes[-1] if suffixes else "")
    is_jsonl = (suffixes[-2] if opener and len(suffixes) > 1 else path.suffix) == ".jsonl"
    count, lineno = 0, 0
    done_before = bar.n if bar is not None else 0  # bytes of the files read before this one
    try:
        with open(path, "rb") as raw:
            stream = opener(raw) if opener else raw
            if doc_per_file and not is_jsonl:
                data = stream.read()
                text = _decode(data, path, lambda e: data.count(b"\n", 0, e.start) + 1)
                if text.strip():
                    count += 1
                    yield text, ""
            else:
                for lineno, line in enumerate(stream, 1):
                    if bar is not None and lineno % 1024 == 0:
                        bar.update(done_before + raw.tell() - bar.n)
                    text = _decode(line, path, lambda e: lineno)
                    if not text.strip():
                        continue
                    count += 1
                    yield _jsonl_document(text, path, lineno) if is_jsonl else (text.rstrip("\r\n"), "")
            if bar is not None:
                bar.update(done_before + raw.tell() - bar.n)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise OpenGLMError(f"{path}: cannot read after line {lineno}: {e}") from e
    if count == 0:
        raise OpenGLMError(f"{path}: no documents (the input is empty)")


def _decode(data: bytes, path: Path, line_of) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenGLMError(f"{path}:{line_of(e)}: invalid UTF-8 ({e.reason} at byte {e.start})") from e


def _jsonl_document(line: str, path: Path, lineno: int) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise OpenGLMError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise OpenGLMError(f'{path}:{lineno}: no string "text" field')
    lang = record.get("lang")
    return text, lang if isinstance(lang, str) else ""


def is_val(text: str, val_fraction: float) -> bool:
    """Whether ``text`` goes to the validation split: a hash of the text, so the answer never changes."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output: str | Path,
    *,
    val_fraction: float = 0.0,
    split: str | None = None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    doc_per_file: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Tokenize ``inputs`` with ``tokenizer`` into shards under ``output``; resumes an interrupted run.

    ``val_fraction`` (by document hash) writes ``train/`` and ``val/``; otherwise every document goes
    to ``split`` (default ``train``). ``workers`` tokenizer processes (default: one per core; 1
    tokenizes in this process). The output does not depend on ``workers``.
    """
    from .tokenizer import load_tokenizer

    paths = [Path(p) for p in inputs]
    if not paths:
        raise OpenGLMError("no input files given")
    for p in paths:
        if not p.is_file():
            raise OpenGLMError(f"no input file at {str(p)!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise OpenGLMError(f"val fraction must be in [0, 1), got {val_fraction}")
    if val_fraction and split is not None:
        raise OpenGLMError("give either a val fraction or a split name, not both")
    if split is not None and not _SPLIT_NAME.fullmatch(split):
        raise OpenGLMError(f"split name {split!r} must be letters, digits, '-' or '_'")
    if shard_tokens <= 0:
        raise OpenGLMError(f"shard tokens must be positive, got {shard_tokens}")
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 1:
        raise OpenGLMError(f"workers must be at least 1, got {workers}")
    splits = ["train", "val"] if val_fraction else [split or "train"]
    output = check_writable(output)
    start = time.perf_counter()

    tok = load_tokenizer(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        sha = hashlib.sha256(tok.save(tmp).read_bytes()).hexdigest()
    run = {
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths],
        "doc_per_file": doc_per_file,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    manifest = _open_manifest(output, tokenizer, tok, sha)
    for name in splits:
        state = manifest["splits"].setdefault(
            name, {"run": run, "complete": False, "documents": 0, "tokens": 0, "next_document": 0, "shards": []}
        )
        if state["run"] != run:
            raise OpenGLMError(
                f"split {name!r} of {output} was prepared from other inputs or settings "
                f"({json.dumps(state['run'])}); write to a new directory"
            )
    if all(manifest["splits"][name]["complete"] for name in splits):
        return PrepareResult(manifest, 0, time.perf_counter() - start, already_complete=True)

    manifest_path = output / "manifest.json"
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    for stale in [*output.glob(".*.tmp"), *(output / "tokenizer").glob(".*.tmp")]:
        stale.unlink()  # a manifest or tokenizer write cut short by a kill
    try:
        _write_manifest(manifest_path, manifest)
        tok.save(output / "tokenizer")
        writers = {name: _SplitWriter(output / name, manifest["splits"][name], shard_tokens) for name in splits}
        lang_ids = {lang: i for i, lang in enumerate(manifest["langs"])}

        from tqdm import tqdm

        bar = tqdm(
            total=sum(p.stat().st_size for p in paths),
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=None if progress else True,
        )

        def chunks() -> Iterator[tuple[list[str], list[tuple[str, int, int]]]]:
            """Chunks of (texts, [(split, lang id, document index)]) of the documents not yet written."""
            texts, meta, chars = [], [], 0
            index = 0
            for path in paths:
                for text, lang in read_documents(path, doc_per_file, bar):
                    name = splits[is_val(text, val_fraction)] if val_fraction else splits[0]
                    if index >= writers[name].state["next_document"]:
                        if lang not in lang_ids:
                            lang_ids[lang] = len(manifest["langs"])
                            manifest["langs"].append(lang)
                        texts.append(text)
                        meta.append((name, lang_ids[lang], index))
                        chars += len(text)
                        if chars >= CHUNK_CHARS:
                            yield texts, meta
                            texts, meta, chars = [], [], 0
                    index += 1
            if texts:
                yield texts, meta

        new_tokens = 0
        with bar:
            for meta, (tokens, lengths) in _tokenize_chunks(chunks(), output / "tokenizer", workers):
                offset = 0
                for (name, lang, index), n in zip(meta, lengths.tolist()):
                    if writers[name].add(tokens[offset : offset + n], lang, index):
                        _write_manifest(manifest_path, manifest)
                    offset += n
                new_tokens += offset
            for writer in writers.values():
                if writer.commit():
                    _write_manifest(manifest_path, manifest)
        for name in splits:
            manifest["splits"][name]["complete"] = True
        _write_manifest(manifest_path, manifest)
    except BaseException:
        # Nothing written yet that a rerun could resume from: leave no half-made directory behind.
        if created and not any(manifest["splits"][name]["shards"] for name in splits):
            shutil.rmtree(output, ignore_errors=True)
        raise
    return PrepareResult(manifest, new_tokens, time.perf_counter() - start, already_complete=False)


def _open_manifest(output: Path, source: str | Path, tok, sha: str) -> dict:
    """The manifest of ``output`` if it has one (same tokenizer required), else a new one."""
    path = output / "manifest.json"
    if path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise OpenGLMError(f"{path} is not an openglm token-shard manifest")
        if manifest["tokenizer"]["sha256"] != sha:
            raise OpenGLMError(
                f"{output} was prepared with another tokenizer ({manifest['tokenizer']['source']}); "
                f"write to a new directory"
            )
        return manifest
    if output.exists() and (not output.is_dir() or any(not f.name.startswith(".") for f in output.iterdir())):
        raise OpenGLMError(f"{output} exists and is not a prepared data directory (no manifest.json)")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": "uint32",
        "eos_between_documents": False,
        "tokenizer": {
            "source": str(source),
            "path": "tokenizer/tokenizer.json",
            "sha256": sha,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "langs": [""],
        "splits": {},
    }


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


class _SplitWriter:
    """Buffers one split's documents and commits them as shards of at most ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, state: dict, shard_tokens: int):
        self.directory, self.state, self.shard_tokens = directory, state, shard_tokens
        self.docs, self.langs, self.tokens, self.last_index = [], [], 0, -1
        directory.mkdir(parents=True, exist_ok=True)
        # Files of a shard the manifest does not list are from an interrupted run: rewritten below.
        done = {s["name"] for s in state["shards"]}
        for f in directory.iterdir():
            if f.is_file() and f.name.split(".")[0] not in done:
                f.unlink()

    def add(self, tokens, lang: int, index: int) -> bool:
        """Buffer one document; returns whether this committed a shard first."""
        committed = bool(self.docs) and self.tokens + len(tokens) > self.shard_tokens and self.commit()
        self.docs.append(tokens)
        self.langs.append(lang)
        self.tokens += len(tokens)
        self.last_index = index
        return committed

    def commit(self) -> bool:
        """Write the buffered documents as the next shard; returns ``False`` when there are none."""
        import numpy as np

        if not self.docs:
            return False
        lengths = np.fromiter(map(len, self.docs), dtype=np.int64, count=len(self.docs))
        offsets = np.zeros(len(self.docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        name = f"{len(self.state['shards']):05d}"
        atomic_write_bytes(self.directory / f"{name}.bin", np.concatenate(self.docs).astype(np.uint32).tobytes())
        atomic_write_bytes(self.directory / f"{name}.idx", offsets.tobytes())
        atomic_write_bytes(self.directory / f"{name}.lang", np.asarray(self.langs, dtype=np.uint16).tobytes())
        self.state["shards"].append({"name": name, "documents": len(self.docs), "tokens": self.tokens})
        self.state["documents"] += len(self.docs)
        self.state["tokens"] += self.tokens
        self.state["next_document"] = self.last_index + 1
        self.docs, self.langs, self.tokens = [], [], 0
        return True


def _tokenize_chunks(chunks, tokenizer_dir: Path, workers: int):
    """Yield ``(meta, (tokens, lengths))`` for each ``(texts, meta)`` chunk, in input order.

    With several workers at most ``2 * workers`` chunks are in flight, so memory stays bounded
    however large the input.
    """
    from .tokenizer import load_tokenizer

    if workers == 1:
        tok = load_tokenizer(tokenizer_dir)
        for texts, meta in chunks:
            yield meta, _encode(tok, texts)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold tokenizer threads, which do not survive a fork.
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(tokenizer_dir,)
    )
    pending = deque()
    try:
        for texts, meta in chunks:
            pending.append((meta, pool.submit(_encode_in_worker, texts)))
            if len(pending) >= 2 * workers:
                meta, future = pending.popleft()
                yield meta, future.result()
        while pending:
            meta, future = pending.popleft()
            yield meta, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_worker_tokenizer = None


def _init_worker(tokenizer_dir: Path) -> None:
    global _worker_tokenizer
    import signal

    from .tokenizer import load_tokenizer

    # Processes are the parallelism; a thread pool in each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C is the parent's to handle: it shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _exit_with_parent() -> None:
    """End this worker as soon as the parent process is gone, however it ended (SIGKILL included):
    a watcher thread waits on the parent's sentinel, which becomes ready when the parent exits."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _encode_in_worker(texts: list[str]):
    return _encode(_worker_tokenizer, texts)


def _encode(tok, texts: list[str]):
    """``(tokens [sum of lengths] uint32, lengths [len(texts)] int64)`` of ``texts``."""
    import numpy as np

    ids = tok.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return tokens, lengths


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare pretraining and instruction data")
    verbs = parser.add_subparsers(dest="data_verb", metavar="<action>", required=True)
    p = verbs.add_parser(
        "prepare",
        help="tokenize text into memory-mapped token shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl files, maybe .gz/.xz")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a bundled name")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="directory to write (or resume) into")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--val-fraction", type=float, default=0.0, metavar="F", help="share of documents for val/")
    which.add_argument("--split", metavar="NAME", help="put every document in this split (default train)")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="tokenizer processes (default: cores; 1: this process)"
    )
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens a shard (default 16M)"
    )
    p.add_argument("--doc-per-file", action="store_true", help="a text file is one document, not one per line")
    p.set_defaults(func=_prepare_command)
    from .instruct import register_instruct

    register_instruct(verbs)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _prepare_command(args: argparse.Namespace) -> int:
    import signal

    # SIGTERM (a job scheduler, `kill`) stops like Ctrl-C: the pool is shut down, its workers end,
    # and the manifest keeps the shards finished so far for the next run to resume from.
    signal.signal(signal.SIGTERM, _interrupt)
    result = prepare(
        args.input,
        args.tokenizer,
        args.output,
        val_fraction=args.val_fraction,
        split=args.split,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        doc_per_file=args.doc_per_file,
        progress=True,
    )
    if result.already_complete:
        print(f"{args.output}: already prepared, nothing to do")
    for name, state in result.manifest["splits"].items():
        print(f"{name}: {state['documents']:,} documents, {state['tokens']:,} tokens, {len(state['shards'])} shards")
    if not result.already_complete:
        rate = result.new_tokens / max(result.seconds, 1e-9)
        print(f"wrote {result.new_tokens:,} tokens in {result.seconds:.1f} s ({rate:,.0f} tokens/s) to {args.output}")
    return 0
