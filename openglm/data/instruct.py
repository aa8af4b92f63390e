"""``openglm data instruct``: build a bilingual (Chinese / English) chat instruction set.

Reads a shared-data directory laid out as::

    tasks/par_*_en_zh.tsv[.xz]          aligned English<TAB>Chinese sentences   -> translation, both ways
    tasks/python_faq_qa.json[.xz]       [{"q", "a"}, ...]                        -> FAQ answers
    tasks/chatterbot_dialogs.jsonl[.xz] {"lang", "category", "turns": [...]}     -> short dialogs
    tasks/*_mc.jsonl[.xz]               held-out multiple-choice evaluation sets -> never trained on
    corpus/train.jsonl[.xz]             {"text", "src", ...}: ``bi_cedict.txt`` lines
                                        ``简体（pinyin）：gloss`` -> dictionary look-ups both ways;
                                        ``zh_poetry.txt`` poems -> poem continuation

and writes ``OUT/train.jsonl`` and ``OUT/val.jsonl``: one ``{"messages": [...]}`` conversation a line
(OpenAI chat format), plus ``OUT/summary.json`` with the counts per source and split.

Leakage: every string of the multiple-choice sets (contexts, choices, and the term a dictionary
question asks about) is collected first; a source item any of whose texts (sentence, headword,
gloss, question, turn) equals one of them, after whitespace and case folding, is dropped. Only the
corpus's ``train`` split is read.

Splits: items are de-duplicated on their texts, then an item goes to ``val`` when a hash of the seed
and its group key (the English sentence, the headword, the first dialog turn...) falls below
``val_fraction``, so the same text never lands in both splits. Everything else random (which items
are kept under ``max_per_source``, phrasings, system messages, which items are chained into
multi-turn conversations) comes from ``random.Random`` seeded by ``seed`` and the source name: the
output is a function of the inputs and the seed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpenGLMError
from ..utils import atomic_write_text

# Default caps of the large sources, so that the set stays around 40k short conversations.
DEFAULT_CAPS = {"translate": 20000, "dictionary": 12000, "poem": 5000}
MAX_EN_CHARS = 300  # a sentence of ~75 tokens: prompts and answers fit a 256-token training row
MAX_ZH_CHARS = 120
MAX_FAQ_CHARS = 700

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a bilingual assistant fluent in English and Chinese. Answer concisely.",
    "You are OpenGLM, an AI assistant. Be accurate and brief.",
    "你是一个乐于助人的助手。",
    "你是一个精通中英文的翻译助手，请准确、简洁地回答。",
    "你是 OpenGLM，一个人工智能助手。",
]
SYSTEM_SHARE = 0.3  # conversations that start with a system message
CHAIN_SHARES = (0.8, 0.15, 0.05)  # translation / dictionary conversations of 1, 2, 3 requests

EN2ZH = [
    "Translate into Chinese:\n{text}",
    "Translate the following sentence into Chinese.\n\n{text}",
    "How do you say this in Chinese?\n{text}",
    "English to Chinese: {text}",
    "把下面这句话翻译成中文：\n{text}",
    "请将以下英文翻译成中文：{text}",
    "翻译成中文：{text}",
]
ZH2EN = [
    "Translate into English:\n{text}",
    "Translate the following Chinese text into English.\n\n{text}",
    "What does this mean in English?\n{text}",
    "Chinese to English: {text}",
    "把下面这句话翻译成英文：\n{text}",
    "请将以下中文翻译成英文：{text}",
    "翻译成英文：{text}",
]
WORD_ZH2EN = [
    "What does the Chinese word “{word}” mean in English?",
    "{word} 的英文意思是什么？",
    "{word} 的英文意思是：",
    "Translate the Chinese word {word} into English.",
    "请解释词语“{word}”的英文含义。",
    "Define {word} in English.",
]
WORD_EN2ZH = [
    "\"{gloss}\" in Chinese is:",
    "What is the Chinese word for \"{gloss}\"?",
    "How do I say \"{gloss}\" in Chinese?",
    "“{gloss}”用中文怎么说？",
    "请给出与“{gloss}”对应的中文词语。",
    "英文“{gloss}”的中文是什么？",
]
WORD_ZH2EN_ANSWER = ["{gloss}", "{gloss}", "It means \"{gloss}\".", "“{word}”的意思是：{gloss}"]
WORD_EN2ZH_ANSWER = ["{word}", "{word}", "{word}（{pinyin}）", "中文是“{word}”。"]
POEM = [
    "续写这首诗：\n{head}",
    "请接着写下去：\n{head}",
    "下面是一首古诗的开头，请续写：\n{head}",
    "Continue this Chinese poem:\n{head}",
    "Here is the beginning of a classical Chinese poem. Please continue it.\n{head}",
    "《{title}》的开头是：\n{head}\n请续写。",
]
FAQ = [
    "{q}",
    "{q}",
    "Python question: {q}",
    "I have a question about Python. {q}",
    "请用英文回答这个 Python 问题：{q}",
    "关于 Python：{q}",
]


@dataclass
class Item:
    """One source item: ``keys`` are its texts for de-duplication and, with ``texts``, for leakage
    checks; ``group`` decides its split; ``turns`` builds its (user, assistant) exchanges from a
    ``random.Random``."""

    keys: tuple[str, ...]
    group: str
    turns: Callable[[random.Random], list[tuple[str, str]]]
    texts: tuple[str, ...] = ()


def _open_text(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def _find(directory: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` plain or compressed, sorted (a stable order makes the output stable)."""
    return sorted(p for suffix in ("", ".xz", ".gz") for p in directory.glob(pattern + suffix))


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _jsonl(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


_EN_TERM = re.compile(r'^"(.+)" in Chinese is:\s*$')
_ZH_TERM = re.compile(r"^(.+?)\s*的英文意思是：\s*$")


def eval_texts(mc_files: Iterable[Path]) -> set[str]:
    """Normalised strings of held-out multiple-choice sets: contexts, choices, and the term a
    dictionary question asks about (``"X" in Chinese is:`` / ``X 的英文意思是：``)."""
    texts = set()
    for path in mc_files:
        for item in _jsonl(path):
            context = item["context"]
            texts.add(_norm(context))
            texts.update(_norm(c) for c in item["choices"])
            for pattern in (_EN_TERM, _ZH_TERM):
                m = pattern.match(context.strip())
                if m:
                    texts.add(_norm(m.group(1)))
    texts.discard("")
    return texts


def _pick(rng: random.Random, templates: list[str], **fields) -> str:
    return rng.choice(templates).format(**fields)


# -- sources: each yields Items ----------------------------------------------------------------------


def translation_items(paths: Iterable[Path]) -> Iterator[Item]:
    """Aligned ``English<TAB>Chinese`` lines; each pair is asked one way, chosen at random."""
    for path in paths:
        with _open_text(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    continue
                en, zh = (p.strip() for p in parts)
                if not en or not zh or len(en) > MAX_EN_CHARS or len(zh) > MAX_ZH_CHARS or _norm(en) == _norm(zh):
                    continue

                def turns(rng, en=en, zh=zh):
                    if rng.random() < 0.5:
                        return [(_pick(rng, EN2ZH, text=en), zh)]
                    return [(_pick(rng, ZH2EN, text=zh), en)]

                yield Item((en, zh), en, turns)


_CEDICT = re.compile(r"^(\S+?)（([^（）]+)）：(.+)$")
_CROSS_REFERENCE = re.compile(r"variant of|see |used in |\[|\||CL:")


def dictionary_items(corpus: Iterable[dict]) -> Iterator[Item]:
    """``bi_cedict.txt`` documents ``简体（pinyin）：gloss``: look-ups zh->en and en->zh.

    Entries that only point at other entries (variants, "see ...", measure words) are skipped.
    """
    for doc in corpus:
        if doc.get("src") != "bi_cedict.txt":
            continue
        m = _CEDICT.match(doc["text"].strip())
        if not m:
            continue
        word, pinyin, gloss = m.groups()
        too_long = len(word) > 8 or len(gloss) > 100
        if too_long or _CROSS_REFERENCE.search(gloss) or not re.search(r"[\u4e00-\u9fff]", word):
            continue

        def turns(rng, word=word, pinyin=pinyin, gloss=gloss):
            if rng.random() < 0.5:
                return [(_pick(rng, WORD_ZH2EN, word=word), _pick(rng, WORD_ZH2EN_ANSWER, word=word, gloss=gloss))]
            return [(_pick(rng, WORD_EN2ZH, gloss=gloss),
                     _pick(rng, WORD_EN2ZH_ANSWER, word=word, pinyin=pinyin))]

        yield Item((word, gloss), word, turns)


def poem_items(corpus: Iterable[dict]) -> Iterator[Item]:
    """``zh_poetry.txt`` documents (title line, then verse lines): the first line(s) as the prompt,
    the next one to three lines as the answer."""
    for doc in corpus:
        if doc.get("src") != "zh_poetry.txt":
            continue
        title, *lines = [ln.strip() for ln in doc["text"].split("\n") if ln.strip()]
        if len(lines) < 2 or any(len(ln) > 40 for ln in lines[:4]):
            continue
        title = title.split("\u3000")[0]

        def turns(rng, title=title, lines=lines):
            cut = rng.randint(1, min(2, len(lines) - 1))
            answer = lines[cut : cut + rng.randint(1, 3)]
            return [(_pick(rng, POEM, title=title, head="\n".join(lines[:cut])), "\n".join(answer))]

        yield Item(tuple(lines[:4]), lines[0], turns)


_RST_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def _faq_answer(text: str) -> str:
    """The first paragraphs of an reST answer, up to ``MAX_FAQ_CHARS``, with roles and ````x```` as ```x```."""
    text = _RST_ROLE.sub(r"`\1`", text).replace("``", "`")
    out = ""
    for para in text.split("\n\n"):
        if out and len(out) + len(para) > MAX_FAQ_CHARS:
            break
        out = f"{out}\n\n{para}" if out else para
    return out[:MAX_FAQ_CHARS].strip()


def faq_items(paths: Iterable[Path]) -> Iterator[Item]:
    """Python FAQ ``{"q", "a"}`` pairs."""
    for path in paths:
        with _open_text(path) as f:
            pairs = json.load(f)
        for pair in pairs:
            q, a = pair["q"].strip(), _faq_answer(pair["a"])
            if q and a:
                yield Item((q,), q, lambda rng, q=q, a=a: [(_pick(rng, FAQ, q=q), a)])


def dialog_items(paths: Iterable[Path], max_exchanges: int = 4) -> Iterator[Item]:
    """Dialogs whose turns alternate user / assistant; a trailing user turn is dropped and long
    dialogs are cut into windows of ``max_exchanges`` exchanges."""
    for path in paths:
        for d in _jsonl(path):
            turns = [t.strip() for t in d["turns"]]
            pairs = [(u, a) for u, a in zip(turns[0::2], turns[1::2]) if u and a]
            for start in range(0, len(pairs), max_exchanges):
                window = pairs[start : start + max_exchanges]
                # Several answers to one question are kept, and share a split through the group.
                yield Item(("\n".join(u + "\n" + a for u, a in window),), window[0][0],
                           lambda rng, window=window: list(window), texts=sum(window, ()))


# -- assembly ------------------------------------------------------------------------------------


def _in_val(seed: int, group: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\0{_norm(group)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _conversation(rng: random.Random, exchanges: list[tuple[str, str]]) -> dict:
    messages = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def build_source(name: str, items: Iterable[Item], banned: set[str], seed: int, val_fraction: float,
                 cap: int | None, chain: bool) -> tuple[list[dict], list[dict], dict]:
    """``(train, val, counts)`` conversations of one source.

    Items with a text in ``banned`` (or in an earlier item) are dropped; ``cap`` items are kept at
    random; with ``chain`` consecutive items are joined into multi-turn conversations.
    """
    seen: set[str] = set()
    kept, leaked, duplicates = [], 0, 0
    for item in items:
        keys = [_norm(k) for k in item.keys]
        if any(k in banned for k in keys) or any(_norm(t) in banned for t in item.texts):
            leaked += 1
        elif any(k in seen for k in keys):
            duplicates += 1
        else:
            seen.update(keys)
            kept.append(item)
    rng = random.Random(f"{seed}:{name}")
    rng.shuffle(kept)
    kept = kept[:cap] if cap is not None else kept
    splits = {"train": [], "val": []}
    for item in kept:
        splits["val" if _in_val(seed, item.group, val_fraction) else "train"].append(item)
    out = {}
    for split, split_items in splits.items():
        conversations, i = [], 0
        while i < len(split_items):
            n = rng.choices((1, 2, 3), weights=CHAIN_SHARES)[0] if chain else 1
            exchanges = [ex for item in split_items[i : i + n] for ex in item.turns(rng)]
            conversations.append(_conversation(rng, exchanges))
            i += n
        out[split] = conversations
    counts = {"items": len(kept), "train": len(out["train"]), "val": len(out["val"]),
              "dropped_eval_overlap": leaked, "dropped_duplicates": duplicates}
    return out["train"], out["val"], counts


def build_instruct(shared_dir: str | Path, output: str | Path, val_fraction: float = 0.05, seed: int = 0,
                   max_per_source: int | None = None, progress: bool = True) -> dict:
    """Build ``output/train.jsonl``, ``output/val.jsonl`` and ``output/summary.json`` from ``shared_dir``
    (layout in the module docstring); returns the summary: counts per source and split."""
    from tqdm import tqdm

    shared, output = Path(shared_dir), Path(output)
    tasks, corpus_dir = shared / "tasks", shared / "corpus"
    if not 0.0 <= val_fraction < 1.0:
        raise OpenGLMError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not tasks.is_dir() and not corpus_dir.is_dir():
        raise OpenGLMError(f"{shared} has neither tasks/ nor corpus/")
    banned = eval_texts(_find(tasks, "*_mc.jsonl"))
    corpus_files = _find(corpus_dir, "train.jsonl")
    corpus_docs: list[dict] = []
    with tqdm(desc="reading", unit=" docs", disable=not progress) as bar:
        for path in corpus_files:
            for doc in _jsonl(path):
                if doc.get("src") in ("bi_cedict.txt", "zh_poetry.txt"):
                    corpus_docs.append(doc)
                bar.update(1)

    def cap(name):
        caps = [c for c in (DEFAULT_CAPS.get(name), max_per_source) if c is not None]
        return min(caps) if caps else None

    sources = {
        "translate": (translation_items(_find(tasks, "par_*_en_zh.tsv")), True),
        "dictionary": (dictionary_items(corpus_docs), True),
        "poem": (poem_items(corpus_docs), False),
        "faq": (faq_items(_find(tasks, "python_faq_qa.json")), False),
        "dialog": (dialog_items(_find(tasks, "chatterbot_dialogs.jsonl")), False),
    }
    train, val, summary = [], [], {"seed": seed, "val_fraction": val_fraction, "sources": {}}
    for name, (items, chain) in tqdm(sources.items(), desc="building", unit=" sources", disable=not progress):
        t, v, counts = build_source(name, items, banned, seed, val_fraction, cap(name), chain)
        train += t
        val += v
        summary["sources"][name] = counts
    if not train:
        raise OpenGLMError(f"no instruction data found under {shared} (expected tasks/ and corpus/ files)")
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(val)
    summary["train"], summary["val"] = len(train), len(val)
    summary["eval_texts_excluded"] = len(banned)
    output.mkdir(parents=True, exist_ok=True)
    for name, conversations in (("train", train), ("val", val)):
        atomic_write_text(output / f"{name}.jsonl",
                          "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations))
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def register_instruct(verbs) -> None:
    """Add ``instruct`` to the ``openglm data`` sub-commands."""
    p = verbs.add_parser("instruct", help="build a bilingual chat instruction set (messages JSONL)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared-dir", required=True, metavar="DIR", help="directory holding tasks/ and corpus/")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="where train.jsonl and val.jsonl go")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="share of items held out in val.jsonl (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and phrasing (default %(default)s)")
    p.add_argument("--max-per-source", type=int, metavar="N", help="keep at most N items of each source")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_instruct_command)


def _instruct_command(args: argparse.Namespace) -> int:
    summary = build_instruct(args.shared_dir, args.output, args.val_fraction, args.seed, args.max_per_source,
                             args.progress)
    width = max(len(n) for n in summary["sources"])
    print(f"{'source':<{width}}  {'train':>7}  {'val':>6}  {'eval overlap dropped':>20}")
    for name, c in summary["sources"].items():
        print(f"{name:<{width}}  {c['train']:>7}  {c['val']:>6}  {c['dropped_eval_overlap']:>20}")
    print(f"{'total':<{width}}  {summary['train']:>7}  {summary['val']:>6}   -> {args.output}")
    return 0
