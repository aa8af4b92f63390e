"""``openglm chat``: talk to a chat model in the terminal, or script it through standard input."""

from __future__ import annotations

import sys

from ..errors import OpenGLMError

DEFAULT_CHAT_MODEL = "glm-tiny-chat"
COMMANDS = ("/system TEXT sets the system prompt (/system alone removes it), /reset forgets the conversation, "
            "/exit quits. Ctrl-C stops an answer, Ctrl-D quits.")


class ChatSession:
    """A conversation with one model: the system prompt, the turns so far, and how to answer the next."""

    def __init__(self, model, tokenizer, template: str, params, system: str | None = None):
        self.model, self.tokenizer, self.template, self.params = model, tokenizer, template, params
        self.system = system
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        """The conversation as ``render_chat`` takes it: the system prompt, then the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def fit(self) -> int:
        """Drop the oldest turns until prompt + ``max_new_tokens`` fits the model; returns the prompt length.

        Raises ``OpenGLMError``, leaving the history as it was, when even the last message alone is too long.
        """
        from .chat import chat_prompt

        limit = self.model.config.max_position_embeddings - self.params.max_new_tokens
        system = [{"role": "system", "content": self.system}] if self.system else []
        history = self.history
        while True:
            n = len(chat_prompt(self.tokenizer, system + history, template=self.template))
            if n <= limit:
                self.history = history
                return n
            if len(history) == 1:
                raise OpenGLMError(f"the prompt ({n} tokens) plus --max-new-tokens {self.params.max_new_tokens} "
                                   f"exceeds the model's {self.model.config.max_position_embeddings} positions")
            history = history[1:]
            while history[0]["role"] != "user":  # start again at a question, never at an answer
                history = history[1:]

    def answer(self, text: str, out, verbose: bool = False) -> str:
        """Stream the reply to ``text`` into ``out``; Ctrl-C stops it early. The reply joins the history."""
        from .chat import chat_stream

        self.history.append({"role": "user", "content": text})
        try:
            n = self.fit()
        except OpenGLMError:
            self.history.pop()
            raise
        if verbose:
            print(f"[prompt: {n} tokens]", file=sys.stderr, flush=True)
        reply = ""
        deltas = chat_stream(self.model, self.tokenizer, self.messages(), params=self.params, template=self.template)
        try:
            for delta in deltas:
                out.write(delta)
                out.flush()
                reply += delta
        except KeyboardInterrupt:  # stop this answer, keep the session and what was said
            out.write(" [stopped]")
        except BaseException:  # the question went unanswered: forget it
            self.history.pop()
            raise
        finally:
            deltas.close()
            out.write("\n")
            out.flush()
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def command(self, line: str, out) -> bool:
        """Run a ``/command``; returns False when the session should end."""
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.history.clear()
            print("(conversation cleared)", file=out, flush=True)
        elif name == "/system":
            self.system = arg.strip() or None
            print(f"(system prompt {'set' if self.system else 'removed'})", file=out, flush=True)
        else:
            print(f"(commands: {COMMANDS})", file=out, flush=True)
        return True


def _lines(interactive: bool):
    """User lines: read with line editing and a prompt on a terminal, else one per line of stdin."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    import readline  # noqa: F401  (gives input() line editing and history)

    while True:
        try:
            yield input(">>> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            print()
        except EOFError:
            print()
            return


def cmd_chat(args) -> int:
    from ..data.chat import CHAT_TOKENS, chat_template_of
    from .cli import _load, _params

    model, tokenizer = _load(args)
    tokenizer.check_glm_special_tokens(CHAT_TOKENS)
    session = ChatSession(model, tokenizer, chat_template_of(args.model), _params(args), system=args.system)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if interactive:
        print(f"openglm chat with {args.model}. {COMMANDS}", flush=True)
    for line in _lines(interactive):
        text = line.strip()
        try:
            if text.startswith("/"):
                if not session.command(text, out):
                    break
            elif text:
                session.answer(text, out, verbose=args.verbose)
        except OpenGLMError as e:  # one bad turn does not end the session
            print(f"openglm: error: {e}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # Ctrl-C just before or after an answer: back to the prompt too
            print(file=out, flush=True)
    return 0


def register(sub) -> None:
    from .cli import _sampling_args

    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)",
                       conflict_handler="resolve",  # --max-new-tokens below replaces the shared one
                       description="Chat with MODEL, streaming its answers and keeping the conversation. "
                                   f"{COMMANDS} With standard input piped, each line is one message: the "
                                   "answers are printed and the command exits at the end of the input.")
    p.add_argument("model", nargs="?", default=DEFAULT_CHAT_MODEL,
                   help=f"chat checkpoint directory or bundled name (default: {DEFAULT_CHAT_MODEL})")
    p.add_argument("--system", default=None, help="system prompt to start with")
    p.add_argument("--verbose", action="store_true", help="print the prompt length before each answer (stderr)")
    _sampling_args(p)
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens in one answer")
    p.set_defaults(func=cmd_chat)
