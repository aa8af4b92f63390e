"""``openglm chat`` driven as a user drives it (a pseudo-terminal, piped stdin), and ``chat_stream``.

The checkpoint has random weights, so the answers are gibberish; what is checked is the session:
streaming, history, /reset, Ctrl-C, exits.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from openglm import SamplingParams, load_model
from openglm.data.chat import CHAT_TEMPLATES, end_of_turn_ids, parse_assistant
from openglm.infer.chat import chat_prompt, chat_stream
from openglm.infer.generate import generate_steps

pexpect = pytest.importorskip("pexpect")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
PROMPT_LEN = re.compile(r"\[prompt: (\d+) tokens\]\r?\n")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_stream_is_the_greedy_reply_up_to_an_end_of_turn(model, tokenizer):
    params = SamplingParams(max_new_tokens=40, temperature=0)
    reply = "".join(chat_stream(model, tokenizer, user("What is GLM?"), params=params))
    steps = list(generate_steps(model, tokenizer, [chat_prompt(tokenizer, user("What is GLM?"))],
                                SamplingParams(max_new_tokens=40, temperature=0)))
    ends = set(end_of_turn_ids(tokenizer))
    tokens = []
    for s in steps:
        if s.token in ends:
            break
        tokens.append(s.token)
    assert reply == tokenizer.decode(tokens).removeprefix("\n")
    assert parse_assistant(reply)["content"] == reply.strip()


def long_answer_question(model, tokenizer, budget: int) -> str:
    """A question whose greedy answer runs the whole ``budget`` without an end of turn, so that a Ctrl-C
    sent once the answer streams lands mid-answer however slow the machine (it has ``budget`` tokens to)."""
    for question in ["Numbers like 2022", "What is GLM?", "hello there", "tell me more", "通用语言模型"]:
        steps = list(generate_steps(model, tokenizer, [chat_prompt(tokenizer, user(question))],
                                    SamplingParams(max_new_tokens=budget, temperature=0,
                                                   stop_token_ids=end_of_turn_ids(tokenizer))))
        if steps[-1].finish_reason == "length":
            return question
    raise AssertionError("no candidate question gives a long answer with this checkpoint")


def spawn(checkpoint, *args):
    return pexpect.spawn(sys.executable, ["-m", "openglm", "chat", str(checkpoint), "--temperature", "0", *args],
                         env=ENV, encoding="utf-8", timeout=60)


def prompt_len(child) -> int:
    child.expect(PROMPT_LEN)
    return int(child.match.group(1))


def run_session(child, steps) -> None:
    """Drive ``child`` through ``steps``; on a failed expectation, show what the terminal showed."""
    child.logfile_read = transcript = io.StringIO()
    try:
        steps(child)
        child.expect(pexpect.EOF)
    except pexpect.ExceptionPexpect as e:
        raise AssertionError(f"session transcript:\n{transcript.getvalue()}") from e
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def streaming(child) -> bool:
    """Whether output arrives: a byte at a time, until a character decodes (UTF-8 takes up to 4 bytes)."""
    text = ""
    for _ in range(4):
        text += child.read_nonblocking(1, timeout=30)
        if text:
            return True
    return False


def wait_for_key(child, timeout: float = 60) -> None:
    """Return once the child sleeps waiting for a key: CPython's readline acts on a signal only there
    (one that lands while it handles a key stays pending until the next key, which it then drops)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{child.pid}/wchan") as f:
            wchan = f.read()
        if state == "S" and ("poll" in wchan or "select" in wchan):
            return
        time.sleep(0.005)
    raise AssertionError(f"the chat never waited for a key (state {state}, in {wchan!r})")


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_checkpoint, model, tokenizer):
    # Half the positions for the answer, half for the history: an answer interrupted late on a slow
    # machine still fits in the next prompt.
    budget = model.config.max_position_embeddings // 2
    question = long_answer_question(model, tokenizer, budget)
    fresh = len(chat_prompt(tokenizer, user("hello")))

    def steps(child):
        child.expect_exact(">>> ")
        child.sendline(question)
        assert prompt_len(child) == len(chat_prompt(tokenizer, user(question)))
        assert streaming(child)  # the answer is streaming in, and cannot end before the Ctrl-C
        child.kill(signal.SIGINT)
        child.expect_exact("[stopped]")
        child.expect_exact(">>> ")
        # The next message works and sees the history, the interrupted turn included.
        child.sendline("hello")
        assert prompt_len(child) > fresh
        assert streaming(child)
        child.expect_exact(">>> ")
        wait_for_key(child)
        child.kill(signal.SIGINT)  # Ctrl-C at the prompt: a fresh prompt
        child.expect_exact(">>> ")
        child.sendline("/exit")

    run_session(spawn(tiny_checkpoint, "--max-new-tokens", str(budget), "--verbose"), steps)


def test_commands_history_and_end_of_input(tiny_checkpoint, tokenizer):
    fresh = len(chat_prompt(tokenizer, user("hello")))

    def steps(child):
        child.expect_exact(">>> ")
        # Ctrl-C at the prompt only drops the line.
        child.send("half a line")
        child.expect_exact("half a line")
        wait_for_key(child)
        child.sendintr()
        child.expect_exact(">>> ")
        child.sendline("hello")
        assert prompt_len(child) == fresh
        child.expect_exact(">>> ")
        child.sendline("hello")
        assert prompt_len(child) > fresh  # multi-turn: the first exchange is in the prompt
        child.expect_exact(">>> ")
        # /reset forgets the conversation: the same message gives a fresh prompt again.
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline("hello")
        assert prompt_len(child) == fresh
        child.expect_exact(">>> ")
        child.sendline("/system Be brief.")
        child.expect_exact("(system prompt set)")
        child.sendline("hello")
        system = [{"role": "system", "content": "Be brief."}]
        assert prompt_len(child) > len(chat_prompt(tokenizer, system + user("hello")))  # history kept
        child.expect_exact(">>> ")
        child.sendeof()  # Ctrl-D at the prompt ends the session

    run_session(spawn(tiny_checkpoint, "--max-new-tokens", "16", "--verbose"), steps)


def test_piped_stdin_answers_each_line_and_exits(tiny_checkpoint, tokenizer):
    run = subprocess.run([sys.executable, "-m", "openglm", "chat", str(tiny_checkpoint), "--temperature", "0",
                          "--max-new-tokens", "16", "--verbose"],
                         input="hello\n\nhello\n/reset\nhello\n", capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    lengths = [int(n) for n in PROMPT_LEN.findall(run.stderr)]
    fresh = len(chat_prompt(tokenizer, user("hello")))
    assert len(lengths) == 3 and lengths[0] == lengths[2] == fresh and lengths[1] > fresh
    assert "(conversation cleared)" in run.stdout
    assert ">>>" not in run.stdout  # no prompts when scripted


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    from openglm.cli import main

    assert main(["chat", str(tmp_path / "nope")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_old_turns_are_dropped_to_fit_the_context(model, tokenizer):
    from openglm.errors import OpenGLMError
    from openglm.infer.chat_cli import ChatSession

    budget = model.config.max_position_embeddings
    session = ChatSession(model, tokenizer, CHAT_TEMPLATES["glm4"], SamplingParams(max_new_tokens=4, temperature=0), system="Be brief.")
    session.answer("hello", io.StringIO())
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    # Leave room for little more than one question: the first exchange must go, the system prompt stays.
    room = budget - len(chat_prompt(tokenizer, session.messages()))
    session.params = SamplingParams(max_new_tokens=room, temperature=0)
    session.history.append({"role": "user", "content": "hello"})
    assert session.fit() == len(chat_prompt(tokenizer, session.messages()))
    assert session.history == [{"role": "user", "content": "hello"}]
    assert session.messages()[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(OpenGLMError, match="exceeds the model's"):
        session.answer("word " * budget, io.StringIO())
    assert session.history == [{"role": "user", "content": "hello"}]  # the refused question is not kept
