"""Streaming and multi-turn chat: same tokens as one-shot generation, history never recomputed."""

import dataclasses

import pytest
import transformers

import kvjax
from kvjax.chat import CapacityError, ChatSession
from kvjax.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer

STOPS = [0, 2]  # <eos>, <|im_end|> of the text checkpoint


@pytest.fixture(scope="module")
def chat_model(text_checkpoint):
    return kvjax.load(text_checkpoint, dtype="float32")


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_stream_equals_generate(gqa_model, chunk_size):
    prompts = [[5, 17, 3, 88, 41, 9, 60], [2, 71, 33]]
    for kwargs in [dict(stop_tokens=[]), dict(temperature=0.9, top_p=0.9, seed=4, stop_tokens=[7, 11])]:
        expected = kvjax.generate(gqa_model, prompts, max_new_tokens=21, **kwargs)
        stream = kvjax.generate_stream(gqa_model, prompts, max_new_tokens=21,
                                       chunk_size=chunk_size, **kwargs)
        pieces = list(stream)
        assert stream.generation.tokens == expected.tokens
        assert [sum((p[row] for p in pieces), []) for row in range(2)] == expected.tokens
        assert len(pieces) >= 1 + (max(map(len, expected.tokens)) - 1) // chunk_size


def test_stream_decoder_never_splits_a_character(chat_model):
    tokenizer = chat_model.tokenizer
    text = "naïve café: 東京タワー 🎉🚀 and 한국어 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # byte-level pieces: characters span several tokens
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add([t]) for t in ids]
    assert decoder.flush() == ""
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE (Llama 2, Gemma): characters outside the vocabulary become
    ``<0xNN>`` byte tokens, joined back by the ByteFallback decoder."""
    import tokenizers

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ["\u2581", "o", "k", "\u2581o", "\u2581ok", "a", "b"]:
        vocab[piece] = len(vocab)
    model = tokenizers.models.BPE(vocab=vocab, merges=[("\u2581", "o"), ("\u2581o", "k")],
                                  byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = tokenizers.normalizers.Sequence([
        tokenizers.normalizers.Prepend("\u2581"), tokenizers.normalizers.Replace(" ", "\u2581")])
    tok.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
        tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
    return Tokenizer(tok)


def test_stream_decoder_with_byte_fallback_tokens():
    tokenizer = byte_fallback_tokenizer()
    text = "ok 東京 🎉 ab"
    ids = tokenizer.encode(text)
    assert sum(1 for t in ids if t < 256) >= 10  # the CJK and emoji went to byte tokens
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add([t]) for t in ids]
    assert decoder.flush() == ""
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "hi"}],
     "message 0 has unknown role 'robot'; roles are system, user, assistant, tool"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}],
     "message 1 must be a dict with \"role\" and \"content\", got {'role': 'user'}"),
    ([{"role": "user", "content": 3}], "message 0 content must be text (a str), got int"),
    ("hi", 'messages must be a list of {"role": ..., "content": ...} dicts'),
])
def test_bad_chat_messages(chat_model, messages, message):
    with pytest.raises(ChatTemplateError) as e:
        chat_model.tokenizer.apply_chat_template(messages)
    assert str(e.value) == message


def test_chat_template_errors(chat_model):
    tokenizer = chat_model.tokenizer
    config = {"chat_template": "{% if messages[0]['role'] != 'user' %}"
                               "{{ raise_exception('the first message must be the user') }}"
                               "{% endif %}{{ messages[0]['content'] }}"}
    refusing = Tokenizer(tokenizer._tokenizer, config)
    with pytest.raises(ChatTemplateError) as e:
        refusing.apply_chat_template([{"role": "system", "content": "x"}])
    assert str(e.value) == ("the chat template refused the messages: "
                            "the first message must be the user")
    broken = Tokenizer(tokenizer._tokenizer, {"chat_template": "{{ messages[0].content | nosuch }}"})
    with pytest.raises(ChatTemplateError) as e:
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    assert str(e.value).startswith("the chat template failed to render: ")
    assert "nosuch" in str(e.value)


def test_stream_decoder_flushes_an_unfinished_character(chat_model):
    tokenizer = chat_model.tokenizer
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    decoder = StreamDecoder(tokenizer)
    held = "".join(decoder.add([t]) for t in ids[:-1])  # the emoji's last byte is missing
    assert held == "ok " and decoder.flush() == tokenizer.decode(ids[:-1])[len("ok "):]


def test_chat_template_matches_transformers(chat_model, text_checkpoint):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    hf = transformers.AutoTokenizer.from_pretrained(text_checkpoint)
    for add in (True, False):
        assert chat_model.tokenizer.apply_chat_template(messages, add_generation_prompt=add) == \
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)


def test_three_turns_equal_generation_from_scratch(chat_model):
    session = ChatSession(chat_model, capacity=256, max_new_tokens=12, stop_tokens=STOPS)
    turns = ["the cat sat", "a dog ran in the park today", "we like to read"]
    for turn, message in enumerate(turns):
        before = list(session.history)
        reply = session.send(message)
        new = session.history[len(before):]
        # The turn's prompt is what the template adds; the reply follows it.
        reply_tokens = new[session.last_stats["prefill_tokens"] - (1 if before else 0):]
        assert session.last_stats["reply_tokens"] == len(reply_tokens)
        scratch = kvjax.generate(chat_model, [session.history[:len(session.history) - len(reply_tokens)]],
                                 max_new_tokens=12, stop_tokens=STOPS)
        assert scratch.tokens[0] == reply_tokens
        assert scratch.texts[0] == reply
        if turn == 2:
            # Only this turn's tokens (plus the previous reply's last token) were prefilled.
            turn_tokens = chat_model.tokenizer.encode(
                "<|im_end|>\n<|im_start|>user\nwe like to read<|im_end|>\n<|im_start|>assistant\n",
                add_special_tokens=False)
            assert session.last_stats["prefill_tokens"] <= len(turn_tokens) + 1
            assert session.last_stats["prefill_tokens"] < len(before) / 2
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    assert session.cache_fill == len(session.history) - 1


def test_a_reply_ending_in_another_stop_token_is_not_prefilled_again(chat_model):
    """With its LM head zeroed every logit is equal, so the model replies ``<eos>`` (id 0,
    the first argmax): a stop token the ChatML template does not write (it ends a turn
    with ``<|im_end|>``). The next turn drops it from the history and prefills only its
    own tokens, and its reply is what generate gives for the rendered conversation."""
    params = dict(chat_model.params, lm_head=chat_model.params["lm_head"] * 0)
    model = dataclasses.replace(chat_model, params=params)
    session = ChatSession(model, capacity=256, max_new_tokens=4, stop_tokens=STOPS)
    assert session.send("the cat sat") == ""
    assert session.history[-1] == 0
    before = len(session.history)
    session.send("a dog ran")
    messages = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "a dog ran"}]
    prompt = model.tokenizer.encode(model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True), add_special_tokens=False)
    assert session.history == prompt + [0]
    # the previous history but its <eos>, re-fed, then the turn's own tokens
    assert session.last_stats["prefill_tokens"] == len(prompt) - (before - 1) + 1
    assert kvjax.generate(model, [prompt], max_new_tokens=4, stop_tokens=STOPS).tokens[0] == [0]


def test_chat_reports_capacity(chat_model):
    session = ChatSession(chat_model, capacity=48, max_new_tokens=16, stop_tokens=STOPS)
    first = session.send("hi")
    with pytest.raises(CapacityError) as e:
        session.send("the cat sat on the mat and the dog ran in the park")
    assert "the conversation has reached the cache capacity" in str(e.value)
    assert ("reset the conversation (ChatSession.reset(), /reset in the CLI chat) or use a "
            "larger capacity") in str(e.value)
    assert session.cache_fill > 0
    session.reset()
    assert session.history == [] and session.messages == [] and session.cache_fill == 0
    # The reset conversation starts again: its reply is the first one, and what generate
    # gives for the rendered prompt from scratch.
    reply = session.send("hi")
    prompt = chat_model.tokenizer.encode(chat_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True), add_special_tokens=False)
    scratch = kvjax.generate(chat_model, [prompt], max_new_tokens=16, stop_tokens=STOPS)
    assert session.history == prompt + scratch.tokens[0]
    assert reply == scratch.texts[0] == first
    assert session.messages == [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": reply}]


def test_chat_needs_a_template(gqa_model):
    with pytest.raises(ValueError) as e:
        ChatSession(gqa_model)
    assert str(e.value) == "chat needs a tokenizer (tokenizer.json in the checkpoint)"
