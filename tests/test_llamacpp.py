"""Our runtime against llama.cpp (llama-cpp-python) on the same GGUF files: slow, `make test-slow`.

llama.cpp computes in quantized arithmetic, so logits differ slightly: we compare teacher-forced
top-1 agreement over 256 tokens of real text, and the tokenizers id for id.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from models.corpus import documents
from models.transformer import Step
from tests.conftest import real_model

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: run `make test-slow`")

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


@cache
def llama(name: str, vocab_only: bool = False) -> object:
    path = str(real_model(name).path)
    return llama_cpp.Llama(path, n_ctx=512, n_batch=512, logits_all=True, vocab_only=vocab_only, verbose=False)


WINDOWS = 8  # 256-token windows, one per evaluation document


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_top1_agreement(name: str) -> None:
    """Mean top-1 agreement over 8 windows of 256 tokens is at least 95%, and the tokens where
    the two disagree are near-ties in our logits (llama.cpp's quantized arithmetic tips them).

    One 256-token window alone ranges 0.91-0.98 here, which is why the mean of several is asserted.
    """
    ours = real_model(name)
    llm = llama(name)
    agreements, margins = [], []
    for doc in documents("eval", limit=WINDOWS + 2):
        ids = ours.tokenizer.encode(doc.text)[:256]
        if len(ids) < 256 or len(agreements) == WINDOWS:
            continue
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)]).argmax(-1)
        ours.model.setup_cache(1, len(ids))
        with torch.no_grad():
            logits = ours.model(torch.tensor([ids]), Step.at(0, len(ids)))[0].numpy()
        mine = logits.argmax(-1)
        agreements.append(float((mine == theirs).mean()))
        top2 = np.sort(logits, -1)[:, -2:]
        margins += list((top2[:, 1] - top2[:, 0])[mine != theirs])
    mean = float(np.mean(agreements))
    print(f"{name}: agreement mean {mean:.3f}, min {min(agreements):.3f}; median margin {np.median(margins):.3f}")
    assert len(agreements) == WINDOWS
    assert mean >= 0.95
    assert float(np.median(margins)) < 0.5, "disagreements should be near-ties, not different predictions"


def _only_space_runs_differ(ours: list[int], theirs: list[int], decode: object) -> bool:
    """True when the two id lists differ only around long runs of spaces: every differing stretch
    decodes to the same text on both sides and contains a run of at least 17 spaces."""
    from difflib import SequenceMatcher

    for tag, i1, i2, j1, j2 in SequenceMatcher(None, ours, theirs, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        a, b = decode(ours[i1:i2]), decode(theirs[j1:j2])
        if a != b or " " * 17 not in a:
            return False
    return True


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_matches_llamacpp(name: str) -> None:
    """SmolLM2: identical ids. Gemma: identical except around runs of 17+ spaces.

    For Gemma we follow transformers (merges ranked by vocabulary order, checked id for id in
    test_real_parity); llama.cpp's score-driven SentencePiece cuts long space runs differently
    (31+5 spaces where BPE merges give 16+20). Both decode to the same text.
    """
    ours = real_model(name).tokenizer
    llm = llama(name, vocab_only=True)
    docs = documents("eval", limit=100)
    different = []
    for d in docs:
        mine = ours.encode(d.text)
        theirs = llm.tokenize(d.text.encode(), add_bos=ours.info.add_bos, special=True)
        if mine != theirs:
            different.append((d.name, _only_space_runs_differ(mine, theirs, ours.decode)))
    if name.startswith("smollm2"):
        assert different == []
    else:
        assert all(spaces_only for _, spaces_only in different), different
