"""sample.py --chat: the HH dialogue kept within the context, scripted sessions on
stdin, clean exits."""
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from conftest import REPO
from lib.checkpoints import save_checkpoint
from lib.tokens import get_tokenizer
from model import GPT, GPTConfig, ScalarGPT
from sample import chat_prompt

SHAPE = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)


@dataclass
class RunConfig:
    max_prompt_tokens: int = 40
    max_response_tokens: int = 16


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    policy = save_checkpoint(str(tmp / "a" / "ckpt.pt"), GPT(SHAPE), RunConfig())
    os.makedirs(tmp / "b")
    shutil.copy(policy, tmp / "b" / "ckpt.pt")  # the same weights under another name
    reward = save_checkpoint(str(tmp / "rm" / "ckpt.pt"), ScalarGPT(SHAPE), RunConfig(),
                             reward_shift=0.0)
    return policy, str(tmp / "b" / "ckpt.pt"), reward


def chat(stdin, *args):
    return subprocess.run([sys.executable, "sample.py", "--chat", "--device", "cpu",
                           "--max_new_tokens", "8", *args],
                          cwd=REPO, input=stdin, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def replies(stdout):
    return [line.split("Assistant", 1)[1] for line in stdout.splitlines() if "Assistant" in line]


def test_chat_prompt_drops_the_oldest_turns_to_fit():
    enc = get_tokenizer()
    turns = [(f"question {i} " + "word " * 5, f" answer {i}.") for i in range(6)]
    full, dropped = chat_prompt(enc, turns, "last one?", 1000)
    assert dropped == 0 and enc.decode(full) == "".join(
        f"\n\nHuman: {h}\n\nAssistant:{a}" for h, a in turns) + "\n\nHuman: last one?\n\nAssistant:"
    ids, dropped = chat_prompt(enc, turns, "last one?", 40)
    assert 0 < dropped < len(turns) and len(ids) <= 40
    # exactly the newest turns
    assert ids == chat_prompt(enc, turns[dropped:], "last one?", 10 ** 6)[0]
    # and as many as fit
    assert len(chat_prompt(enc, turns[dropped - 1:], "last one?", 10 ** 6)[0]) > 40
    # a message too long on its own keeps its end
    ids, dropped = chat_prompt(enc, turns, "long " * 100, 20)
    assert dropped == len(turns) and len(ids) == 20
    assert enc.decode(ids).endswith("long \n\nAssistant:")


def test_chat_session_from_stdin_with_reset_and_quit(ckpts):
    out = chat("hello\nhow are you?\n/reset\nagain\n/quit\nnot read\n", "--init_from", ckpts[0])
    assert out.returncode == 0, out.stderr
    assert "(conversation reset)" in out.stdout and "Traceback" not in out.stderr
    assert len(replies(out.stdout)) == 3  # three messages before /quit, nothing after it


def test_long_conversation_drops_old_turns_once_and_ctrl_d_ends(ckpts):
    out = chat("".join(f"message number {i} " + "blah " * 12 + "\n" for i in range(5)),
               "--init_from", ckpts[0])
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.count("the oldest turns are dropped") == 1  # said once
    assert len(replies(out.stdout)) == 5


def test_two_models_answer_side_by_side_with_rewards(ckpts):
    a, b, rm = ckpts
    out = chat("hi there\nand now?\n", "--init_from", f"{a},{b}", "--reward_ckpt", rm,
               "--temperature", "1.0")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "Assistant [" in line]
    assert len(lines) == 4 and all("(reward " in line for line in lines)
    assert lines[0].startswith(f"Assistant [{a}]") and lines[1].startswith(f"Assistant [{b}]")
    # the same weights with the same seed say the same: each model samples with its own generator
    reply = lambda line: line.split("]", 1)[1]
    assert reply(lines[0]) == reply(lines[1]) and reply(lines[2]) == reply(lines[3])


def test_ctrl_c_ends_cleanly(ckpts):
    proc = subprocess.Popen([sys.executable, "sample.py", "--chat", "--device", "cpu",
                             "--max_new_tokens", "8", "--init_from", ckpts[0]],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert "chat with" in proc.stdout.readline()  # the model is loaded and the conversation started
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
