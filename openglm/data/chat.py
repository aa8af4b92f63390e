"""Chat conversations as token ids: GLM-4's chat template, the training loss mask, tool calls.

A conversation renders as GLM-4-9B-chat renders it::

    [gMASK]<sop><|system|>\\n{system}<|user|>\\n{question}<|assistant|>\\n{answer}<|user|>\\n...

Tools are declared in a system turn; the assistant calls one by writing ``{name}\\n{json arguments}``
after ``<|assistant|>``, and the result comes back as ``<|observation|>\\n{result}``. The template is
Jinja source kept in ``CHAT_TEMPLATES`` and saved with a chat checkpoint, rendered with the same
sandboxed Jinja environment as ``transformers``' ``apply_chat_template``, so a checkpoint's own
template (a real GLM-4's, say) is honoured.

Role tokens come only from the template: text inside messages and tool declarations is encoded with
``allow_special=False``, so a user who types ``<|assistant|>`` gets those characters, not a turn.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from ..errors import OpenGLMError
from ..utils import atomic_write_text

# GLM-4-9B-chat's template, as its tokenizer_config.json has it: tools are declared by the message that
# carries them (``item['tools']``), an assistant tool call is an assistant turn whose ``metadata`` is the
# function name and whose content is the JSON arguments, a tool result is an ``observation`` turn.
_GLM4 = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% elif tool['type'] == 'python' %}\n\n## python\n\n"
    "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
    "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    "{% elif tool['type'] == 'simple_browser' %}\n\n## simple_browser\n\n"
    "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，"
    "可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。"
    "选择多个角度的页面，同时尽可能选择可信任的信息来源。"
    "考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
    "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    "{% elif tool['type'] == 'cogview' %}\n\n## cogview\n\n"
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
    "你需要向 `cogview` 发送图像描述，规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"glm4": _GLM4}
DEFAULT_TEMPLATE = "glm4"

ROLES = ("system", "user", "assistant", "tool", "observation")
END_OF_TURN_TOKENS = ("<|user|>", "<|observation|>", "<|endoftext|>")
CHAT_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save it


# -- the template registry and checkpoints ----------------------------------------------------------


def chat_template_of(tokenizer_or_checkpoint_dir) -> str:
    """The chat template saved with a checkpoint (or set on a tokenizer), else ``CHAT_TEMPLATES["glm4"]``.

    Accepts a checkpoint directory or bundled name, or a tokenizer object with a ``chat_template``
    attribute (as ``transformers`` tokenizers have). A directory is read the way ``transformers``
    reads it: ``chat_template.jinja``, else ``"chat_template"`` in ``tokenizer_config.json`` (a string,
    or a list of named templates of which ``"default"`` is taken).
    """
    source = tokenizer_or_checkpoint_dir
    if isinstance(source, (str, Path)):
        from ..paths import resolve_checkpoint

        path = resolve_checkpoint(source)
        directory = path.parent if path.is_file() else path
        template = _read_template(directory)
    else:
        template = getattr(source, "chat_template", None)
    return template or CHAT_TEMPLATES[DEFAULT_TEMPLATE]


def _read_template(directory: Path) -> str | None:
    jinja = directory / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / TOKENIZER_CONFIG
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise OpenGLMError(f"{config} is not a valid tokenizer config: {e}") from None
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def save_chat_template(directory: str | Path, template: str = CHAT_TEMPLATES[DEFAULT_TEMPLATE]) -> None:
    """Store ``template`` as ``"chat_template"`` in ``directory/tokenizer_config.json`` (the HF convention).

    Other fields of an existing ``tokenizer_config.json`` are kept, so call this after the tokenizer
    is saved (``Tokenizer.save`` writes that file afresh).
    """
    _compile(template)  # refuse to save a template that would fail every load
    path = Path(directory) / TOKENIZER_CONFIG
    config = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenGLMError(f"{path} is not valid JSON: {e}") from None
    config["chat_template"] = template
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in the sandboxed environment ``transformers`` renders chat templates in."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own would HTML-escape and ignore these options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise OpenGLMError(f"chat template does not compile: {e}") from None


# -- OpenAI-style messages -> the template's messages -------------------------------------------------


def _text(message: dict, i: int, required: bool = True) -> str | None:
    content = message.get("content")
    if content is None and not required:
        return None
    if isinstance(content, list):  # OpenAI content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise OpenGLMError(f"message {i}: only text content parts are supported")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise OpenGLMError(f"message {i} ({message.get('role')}): content must be a string, got {content!r}")
    return content


def _tool_call(call, i: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise OpenGLMError(f"message {i}: a tool call needs function.name, got {call!r}")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"role": "assistant", "metadata": name, "content": arguments}


def to_template_messages(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[dict]:
    """OpenAI-style ``messages`` (and ``tools``) in the form GLM-4's template reads.

    ``tool`` messages become ``observation`` turns; each tool call of an assistant message becomes its
    own assistant turn ``{"metadata": name, "content": arguments}`` (after the message's text, if any);
    ``tools`` ride on the first message, where the template declares them in a system turn.
    Raises ``OpenGLMError`` on an empty list, an unknown role or missing content.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise OpenGLMError("a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OpenGLMError(f"message {i} is not an object: {m!r}")
        role = m.get("role")
        if role not in ROLES:
            raise OpenGLMError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise OpenGLMError(f"message {i}: tool_calls must be a list")
            content = _text(m, i, required=not calls)
            if content or not calls:
                out.append({"role": "assistant", "content": content})
            out.extend(_tool_call(c, i) for c in calls)
        else:
            out.append({"role": "observation" if role == "tool" else role, "content": _text(m, i)})
    if tools:
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) and "type" in t for t in tools):
            raise OpenGLMError('tools must be a list of objects like {"type": "function", "function": {...}}')
        out[0] = {**out[0], "tools": list(tools)}
    return out


# -- rendering ---------------------------------------------------------------------------------------


class _Hider:
    """Swaps special-token strings inside the data for placeholders before rendering, and back after.

    Then every special-token string left in the rendered text was written by the template itself.
    The placeholders are plain ASCII letters and digits, so JSON escaping and stripping leave them whole.
    """

    def __init__(self, specials: Sequence[str]):
        self.specials = list(specials)
        self.nonce = uuid.uuid4().hex
        self.find = re.compile("|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)))
        self._back = re.compile(f"Q{self.nonce}(\\d+)Q")
        self._index = {s: i for i, s in enumerate(self.specials)}

    def hide(self, data):
        if isinstance(data, str):
            return self.find.sub(lambda m: f"Q{self.nonce}{self._index[m.group()]}Q", data)
        if isinstance(data, dict):
            return {self.hide(k): self.hide(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.hide(v) for v in data]
        return data

    def restore(self, text: str) -> str:
        return self._back.sub(lambda m: self.specials[int(m.group(1))], text)


def _render(template: str, messages: list[dict], tools, add_generation_prompt: bool) -> str:
    import jinja2

    try:
        return _compile(template).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise OpenGLMError(f"chat template failed: {e}") from None


def render_chat_text(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                     template: str | None = None) -> str:
    """The conversation as text, exactly as ``transformers``' ``apply_chat_template(tokenize=False)`` gives it
    for the same template and ``to_template_messages(messages, tools)``."""
    template = template or CHAT_TEMPLATES[DEFAULT_TEMPLATE]
    return _render(template, to_template_messages(messages, tools), tools, add_generation_prompt)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                  template: str | None = None) -> list[int]:
    """Token ids of a conversation to generate the assistant's next turn from: ``render_chat``'s ids
    with ``add_generation_prompt=True``, in time linear in the conversation (one rendering, one pass
    of the tokenizer), where ``render_chat`` renders every prefix to find the assistant's tokens."""
    template = template or CHAT_TEMPLATES[DEFAULT_TEMPLATE]
    items = to_template_messages(messages, tools)
    tokenizer.check_glm_special_tokens(CHAT_TOKENS)
    hider = _Hider(tokenizer.special_ids)
    text = _render(template, hider.hide(items), hider.hide(tools), True)
    return _tokenize(tokenizer, hider, text, [], [])[0]


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its training loss mask: ``(ids, loss_mask)``, equal lengths.

    ``messages`` are OpenAI-style: ``{"role": "system"|"user"|"assistant"|"tool"|"observation",
    "content": str}``, an assistant message possibly with ``"tool_calls": [{"type": "function",
    "function": {"name", "arguments"}}]``. ``tools`` are OpenAI tool declarations. ``template`` is
    Jinja source (default: GLM-4's).

    ``ids`` are those of ``apply_chat_template(..., tokenize=True)`` on the same conversation, plus a
    final ``<|endoftext|>`` when the conversation ends with an assistant turn (GLM-4's chat models
    stop there). ``loss_mask[i]`` is 1 for the tokens the assistant wrote (after the
    ``<|assistant|>`` that the prompt supplies) and for the token ending each assistant turn (the
    next role token, or that final ``<|endoftext|>``), 0 elsewhere. Message and tool text is encoded
    with ``allow_special=False``.
    """
    template = template or CHAT_TEMPLATES[DEFAULT_TEMPLATE]
    items = to_template_messages(messages, tools)
    tokenizer.check_glm_special_tokens(CHAT_TOKENS)
    hider = _Hider(tokenizer.special_ids)
    items, hidden_tools = hider.hide(items), hider.hide(tools)

    def render(k: int, generation_prompt: bool = False) -> str:
        return _render(template, items[:k], hidden_tools, generation_prompt)

    # Render growing prefixes of the conversation: message k adds text[starts[k]:starts[k + 1]].
    prefixes = [render(k) for k in range(len(items) + 1)]
    text = render(len(items), add_generation_prompt)
    if not all(text.startswith(p) for p in prefixes):
        raise OpenGLMError("chat template is not incremental (a conversation's rendering does not start with "
                           "that of its first messages), so the assistant's tokens cannot be found")
    starts = [len(p) for p in prefixes]
    spans, ends = [], []  # trained character spans; positions whose token ends an assistant turn
    for k, item in enumerate(items):
        if item["role"] != "assistant" or starts[k + 1] == starts[k]:
            continue
        prompt = render(k, True)[starts[k]:]  # what the prompt supplies before the assistant writes
        at = text.find(prompt, starts[k], starts[k + 1])  # after the tools a first message may carry
        if not prompt or at == -1:
            raise OpenGLMError("chat template is not incremental: an assistant turn does not hold its "
                               "generation prompt, so the assistant's tokens cannot be found")
        spans.append((at + len(prompt), starts[k + 1]))
        ends.append(starts[k + 1])
    ids, mask = _tokenize(tokenizer, hider, text, spans, ends)
    if ends and ends[-1] == len(text):  # the conversation ends with the assistant's turn
        ids.append(tokenizer.token_id("<|endoftext|>"))
        mask.append(1)
    return ids, mask


def _tokenize(tokenizer, hider: _Hider, text: str, spans, ends) -> tuple[list[int], list[int]]:
    """Ids of ``text`` (special-token strings in it are the template's) and the mask from character spans."""
    def inside(c: int) -> bool:
        return any(a <= c < b for a, b in spans)

    ids, mask = [], []
    pos = 0
    for m in [*hider.find.finditer(text), None]:
        stop = m.start() if m else len(text)
        if stop > pos:  # a text run between special tokens
            run = text[pos:stop]
            run_ids = tokenizer.encode(hider.restore(run))
            cuts = sorted({pos, stop, *(c for c in [*(x for s in spans for x in s), *ends] if pos < c < stop)})
            done = 0
            for a, b in zip(cuts, cuts[1:]):
                # the tokens of text[pos:b] agree with the run's own up to a BPE merge across the cut
                n = len(run_ids)
                if b < stop:
                    n = max(done, _common_prefix(tokenizer.encode(hider.restore(text[pos:b])), run_ids))
                mask += [int(inside(a) or (a in ends and i == done)) for i in range(done, n)]
                done = n
            ids += run_ids
        if m:
            ids.append(tokenizer.token_id(m.group()))
            mask.append(int(inside(m.start()) or m.start() in ends))
            pos = m.end()
    return ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn, so generation stops on them: ``<|user|>``, ``<|observation|>``, ``<|endoftext|>``."""
    return [tokenizer.token_id(t) for t in END_OF_TURN_TOKENS]


# -- generated text -> an OpenAI-style message --------------------------------------------------------


def _tool_names(tools) -> set[str]:
    names = set()
    for t in tools or []:
        function = t.get("function") if isinstance(t, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def parse_assistant(text: str, tools: list[dict] | None = None) -> dict:
    """Generated assistant text -> ``{"role": "assistant", "content": ..., "tool_calls": [...]}``.

    GLM-4 writes a reply as ``\\n{text}`` and a tool call as ``{name}\\n{json arguments}``, several
    turns joined by ``<|assistant|>``. A turn is a tool call only when ``tools`` declare ``name`` and
    the arguments are a JSON object; ``tool_calls`` is then present (OpenAI-style, with fresh
    ``call_...`` ids) and ``content`` is the remaining text or None. Text with or without the
    leading newline parses the same.
    """
    names = _tool_names(tools)
    content, calls = [], []
    for part in text.split("<|assistant|>"):
        name, newline, body = part.partition("\n")
        if newline and name.strip() in names and _is_json_object(body):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": name.strip(), "arguments": body.strip()}})
        else:
            content.append(body if newline and not name.strip() else part)
    text = "".join(content).strip()
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False
