"""The bundled default model ``kvjax/assets/kvjax-tiny`` (trained by scripts/train_tiny.py).

It must be a standard Hugging Face Llama directory (transformers loads it and greedy
decoding agrees with kvjax token for token), small enough to ship (<= 10 MB), produce
mostly English words, and the training script must still work end to end (``--smoke``).
torch and transformers are the reference implementation here only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import kvjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = kvjax.BUNDLED_MODEL
TRAIN_SCRIPT = os.path.join(ROOT, "scripts", "train_tiny.py")
MAX_BYTES = 10_000_000

PARITY_PROMPTS = ["The module", "Return the number of items in the list."]  # the 2nd emits <|endoftext|>
PARITY_STEPS = 24
ENGLISH_PROMPT = "The function returns"
ENGLISH_STEPS = 40
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")

# A fixed list of common English words and words of Python's documentation, written
# by hand (not taken from the model's output).
ENGLISH_WORDS = frozenset("""
a about above accept accepted accepts access according across act action actual actually add
added adding after again against all allow allowed allows almost alone along already also
alternative although always among an and another any anything apply applied are area argument
arguments around as ask associated at attempt attribute attributes available avoid away back
based basic be because become been before begin beginning behavior behaviour being below best
better between beyond both bound break but by call callable called caller calling calls can
cannot case cases cause certain change changed changes character characters check checked
checks child choose class classes clear close closed code come common compare compared
complete compute condition consider considered contain contained containing contains content
context control convert copy correct could count create created creates current data date
day default define defined defines definition delete described description determine did
different directly directory do does doing done down during each either element elements
else empty enable encoding end ending enough ensure entire entry environment equal equivalent
error errors even event every exactly example except exception exceptions execute executed
exist existing exists expected explicitly expression expressions extra fact fail failed
false few field fields file files find first following follows for form format found four
frame free from full function functions further get gets give given gives global go good
group had handle handler has have having he header help her here high him his hold how
however if ignore ignored immediately implementation import important in include included
includes including index indicate information initial input inside instance instances
instead integer interface internal into is it item items its itself just keep key keys
keyword keywords kind know known large last later least left length less let level like
limit line lines list little local long look loop low made main make makes making many map
may maximum me mean means memory message method methods might minimum missing mode module
modules more most much must my name named names need needed needs negative never new next
no non none normal normally not note nothing now null number numbers object objects obtain
of off often old on once one only open operation operations optional or order other others
otherwise our out output over own pair parameter parameters part particular pass passed
path pattern per place point position positive possible prefix present previous print
probably process program provide provided provides put raise raised raises range rather
read reading real reason record reference regular related remove removed replace request
required requires result results return returned returns right run running same save second
see seen self send sequence set sets setting several shall she should show side similar
simple since single size so some something source special specific specified start state
statement still stop store stored stream string strings subclass such suffix support
supported sure system table take taken takes target test text than that the their them then
there therefore these they thing things this those though three through thus time times to
together too true try tuple two type types under unless until up upon us use used user uses
using usually valid value values variable variables version very via want was way we well
were what when where whether which while who whole why will with within without word words
work works would write written yet you your zero
abstract add address alias api array ascii assert assignment async attr await binary bit
bits block body bool boolean buffer byte bytes cache char chr cls codec command compile
compiler config connection constant constructor cursor decimal decode decorator def del
delimiter dict dictionary digit digits docstring encode encoded enum eof eval exc exec exit
expr extension filename flag flags float floating fn func generator getattr hash hashable
id identifier implement implemented init int iterable iterator iterate kwargs lambda len
lib library lineno locale lock loader mapping match max min mod mutable namespace newline
nonlocal obj offset operand operator opt optionally os parse parsed parser pickle prompt
property protocol proxy python queue raw recursive regex repr returns rfc sep setattr
signal slice socket sort sorted spec stack stderr stdin stdout str struct sub super syntax
sys tag thread timeout token traceback tuple unicode url utf var whitespace
""".split())


@pytest.fixture(scope="module")
def bundled():
    if not os.path.isfile(os.path.join(BUNDLED, "model.safetensors")):
        pytest.fail(f"the bundled model is missing at {BUNDLED}: run python scripts/train_tiny.py")
    return kvjax.load(BUNDLED, dtype="float32")


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED)
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    return tokenizer, model


def test_directory_is_a_small_standard_llama_checkpoint():
    files = set(os.listdir(BUNDLED))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= files
    size = sum(os.path.getsize(os.path.join(BUNDLED, f)) for f in files)
    assert size <= MAX_BYTES, f"{BUNDLED} is {size:,} bytes, over the {MAX_BYTES:,} budget"
    with open(os.path.join(BUNDLED, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert kvjax.ModelConfig.from_dict(config).num_kv_heads < kvjax.ModelConfig.from_dict(config).num_heads
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(BUNDLED, "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0
    with open(os.path.join(BUNDLED, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == [tok.token_to_id("<|endoftext|>"),
                                          tok.token_to_id("<|im_end|>")]
    assert generation["do_sample"] is False
    text = "Any text — ünïcode, tabs\tand\nnewlines — round-trips: λx. x ** 2 🙂"
    assert tok.decode(tok.encode(text).ids) == text


def test_transformers_and_kvjax_agree(bundled, hf):
    import torch

    tokenizer, model = hf
    generation = kvjax.generate(bundled, PARITY_PROMPTS, max_new_tokens=PARITY_STEPS, stop_tokens=[])
    for prompt, kv_tokens in zip(PARITY_PROMPTS, generation.tokens):
        ids = tokenizer(prompt)["input_ids"]
        assert ids == bundled.tokenizer.encode(prompt), prompt
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=PARITY_STEPS, min_new_tokens=0,
                                 eos_token_id=[], pad_token_id=0)
        hf_tokens = out[0, len(ids):].tolist()
        assert len(hf_tokens) == PARITY_STEPS
        assert kv_tokens == hf_tokens, (prompt, kv_tokens, hf_tokens)
        assert tokenizer.decode(hf_tokens, skip_special_tokens=True) == bundled.tokenizer.decode(kv_tokens)


def test_chat_template_renders_chatml(hf):
    tokenizer, _ = hf
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What does len() return?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                        "<|im_start|>user\nWhat does len() return?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    with open(os.path.join(BUNDLED, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHATML
    # The special tokens are single tokens in both tokenizers.
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]


def test_greedy_output_is_mostly_english(bundled):
    generation = kvjax.generate(bundled, [ENGLISH_PROMPT], max_new_tokens=ENGLISH_STEPS, stop_tokens=[])
    text = generation.texts[0]
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    known = [w for w in words if w in ENGLISH_WORDS]
    assert len(words) >= 10, f"too few words in {text!r}"
    assert len(known) >= 0.7 * len(words), (
        f"only {len(known)}/{len(words)} dictionary words in {text!r}; unknown: "
        f"{sorted(set(words) - ENGLISH_WORDS)}")


def test_train_script_smoke(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out loss" in result.stdout
    assert os.listdir(tmp_path) == ["tiny"]  # written atomically: no temp dir left behind
    model = kvjax.load(str(out), dtype="float32")
    assert model.stop_tokens == (0, 2)
    generation = kvjax.generate(model, ["The module"], max_new_tokens=5, stop_tokens=[])
    assert len(generation.tokens[0]) == 5 and isinstance(generation.texts[0], str)
    with open(out / "README.md") as f:
        assert "held-out loss" in f.read()
