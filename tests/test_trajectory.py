import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mem1_fast.tiny import word_tokenizer
from mem1_fast.trajectory import Kind, Trajectory, TrajectoryError, split_generation, think_splitter

GOOD = [("PROMPT", 0, [5, 6]), ("STATE", 0, [7]), ("ACTION", 0, [8]), ("OBS", 0, [9]),
        ("STATE", 1, [7, 7]), ("ACTION", 1, [8])]
LPS = [None, [-0.1], [-0.2], None, [-0.3, -0.4], [-0.5]]


def test_from_triples_roundtrip():
    t = Trajectory.from_triples(GOOD, LPS)
    assert t.num_turns == 2 and len(t) == 8 and t.num_generated() == 5
    assert t.generation(1) == [7, 7, 8] and t.generation_logprobs(1) == [-0.3, -0.4, -0.5]
    assert t.observation(0) == [9] and t.segments[1].kind == Kind.STATE


@pytest.mark.parametrize("triples,lps,msg", [
    ([], None, "empty trajectory"),
    ([("PROMPT", 0, [])], None, "empty prompt"),
    ([("PROMPT", 0, [1])], None, "no generated turn"),
    ([("STATE", 0, [1]), ("PROMPT", 0, [1])], None, "must be PROMPT"),
    ([("PROMPT", 0, [1]), ("ACTION", 0, [2]), ("STATE", 0, [3])], None, "out of order"),
    ([("PROMPT", 0, [1]), ("STATE", 0, [2]), ("OBS", 0, [3]), ("STATE", 2, [4])], None, "out of order"),
    ([("PROMPT", 0, [1]), ("OBS", 0, [3])], None, "out of order"),
    ([("PROMPT", 0, [1]), ("STATE", 0, [2]), ("STATE", 1, [4])], None, "no observation"),
    ([("PROMPT", 0, [1]), ("STATE", 0, []), ("ACTION", 0, [])], None, "no generated tokens"),
    ([("PROMPT", 0, [1]), ("STATE", 0, [2, 3])], [None, [-1.0]], "log-probs for 2 tokens"),
    ([("PROMPT", 0, [1]), ("STATE", 0, [2]), ("OBS", 0, [3])], [None, None, [-1.0]], "only generated"),
    ([("PROMPT", 0, [1]), ("STATE", 0)], None, r"expected \(kind, turn, token_ids\)"),
])
def test_bad_trajectories_are_named(triples, lps, msg):
    with pytest.raises(TrajectoryError, match=msg):
        Trajectory.from_triples(triples, lps)


def test_split_single_token_tag():
    tok = word_tokenizer(["<think>", "</think>", "a", "b", "<search>", "</search>"])
    ids = tok.encode("<think> a b </think> <search> a </search>", add_special_tokens=False)
    state, action = split_generation(ids, think_splitter(tok))
    assert tok.decode(state) == "<think> a b </think>" and tok.decode(action) == "<search> a </search>"
    assert state + action == ids
    # no </think>: everything is the action, as in MEM1
    ids2 = tok.encode("<search> a </search>", add_special_tokens=False)
    assert split_generation(ids2, think_splitter(tok)) == ([], ids2)


def test_split_multi_token_tag_on_ids():
    # a character-level BPE where "</think>" spans several tokens
    corpus = ["<think> abc </think> <search> q </search>", "hello world </thin x"]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert len(tok.encode("</think>", add_special_tokens=False)) > 1
    text = "<think> abc </think> <search> q </search>"
    ids = tok.encode(text, add_special_tokens=False)
    state, action = split_generation(ids, think_splitter(tok))
    assert state + action == ids  # ids are cut, never re-tokenized
    assert tok.decode(state).endswith("</think>") and "</think>" not in tok.decode(state[:-1])
