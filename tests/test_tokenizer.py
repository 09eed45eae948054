"""minisd.tokenizer against OpenCLIP's own SimpleTokenizer (the tokenizer SD2 was trained with).

The reference is open_clip/tokenizer.py from open_clip_torch==3.3.0, installed *without* its dependencies
(`pip install --no-deps open_clip_torch==3.3.0`; the test extra brings ftfy and regex). We load that one file by
path: `import open_clip` would run the package __init__, which imports torchvision.
"""
import importlib.util
import json
import types
import unicodedata
from pathlib import Path

import pytest
import torch

from minisd.paths import weights_dir
from minisd.tokenizer import CONTEXT_LENGTH, EOT, PAD, SOT, VOCAB_SIZE, Tokenizer

INSTALL_HINT = "pip install --no-deps open_clip_torch==3.3.0 ftfy regex"

PROMPTS = [
    "a photo of a cat",
    "Hello!!",
    "a,b;c",
    "What?! No... (maybe) [x] {y} <z> #1 @home 50% $3 a/b a\\b a|b",
    "1234",
    "3.5mm",
    "0.5 mg/kg, 120/80 mmHg, 37.2°C",
    "café crème brûlée, naïve façade, Ærøskøbing",
    "Straße Ελληνικά русский",
    "中文提示 日本語のテキスト 한국어",
    "emoji 🙂🚀 and 👩‍⚕️ doctor",
    "&amp;",
    "&lt;b&gt;bold&lt;/b&gt;",
    "fish &amp;amp; chips",
    "tabs\tand\nnewlines\r\n  and   runs    of spaces  ",
    "   leading and trailing   ",
    "",
    "   ",
    "chest x-ray, PA view, cardiomegaly",
    "T2-weighted prostate MRI, PI-RADS 4",
    "H&E stained histopathology patch of lymph node metastasis",
    "CT abdomen w/ contrast: hepatic lesion 2.3 cm (segment VII)",
    "frontal chest radiograph showing left lower lobe consolidation and small pleural effusion",
    "AND",
    "cat AND dog",
    "patient's",
    "the patient's doctor's notes: it's, we're, they've, I'm, we'll, he'd",
    "PATIENT'S X-RAY",
    "a__b--c..d",
    "ultra-detailed, 8k, trending on artstation, by greg rutkowski",
    "don't stop 'quoted' ''",
    " ".join(f"word{i}" for i in range(60)),  # > 77 tokens: truncation
    "lung " * 100,
]


def load_openclip_tokenizer_module() -> types.ModuleType:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"open_clip_torch is needed as the reference tokenizer; install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    # tokenizer.py has only absolute imports (gzip, html, ftfy, numpy, regex, torch...): it loads on its own.
    module_spec = importlib.util.spec_from_file_location("openclip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as err:
        pytest.fail(f"cannot load {path} ({err}); install the test extra: {INSTALL_HINT}")
    return module


@pytest.fixture(scope="module")
def openclip():
    """(SimpleTokenizer with ftfy, the same without ftfy, ftfy.fix_text)."""
    module = load_openclip_tokenizer_module()
    real_fix_text = module.ftfy.fix_text
    with_ftfy = module.SimpleTokenizer()
    without_ftfy = module.SimpleTokenizer()

    def call(tokenizer, fix_text):
        # basic_clean looks `ftfy.fix_text` up in the module at call time: swap the name, not ftfy itself.
        def run(texts):
            module.ftfy = types.SimpleNamespace(fix_text=fix_text)
            try:
                return tokenizer(texts), [tokenizer.encode(t) for t in texts]
            finally:
                module.ftfy = types.SimpleNamespace(fix_text=real_fix_text)
        return run

    return call(with_ftfy, real_fix_text), call(without_ftfy, lambda text: text), real_fix_text, with_ftfy


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_vocab_files_equal_openclip_vocab(openclip):
    reference = openclip[3]
    folder = weights_dir()
    vocab = json.loads((folder / "clip_vocab.json").read_text(encoding="utf-8"))
    assert vocab == reference.encoder and len(vocab) == VOCAB_SIZE
    merges = (folder / "clip_merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert [tuple(m.split()) for m in merges] == sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    assert (reference.sot_token_id, reference.eot_token_id) == (SOT, EOT)


def test_prompt_list_is_varied_enough():
    assert len(PROMPTS) >= 30


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_openclip(tok, openclip, prompt):
    with_ftfy, without_ftfy, fix_text, _ = openclip
    # Where ftfy would rewrite the prompt, compare with OpenCLIP minus ftfy (the documented gap, tested below).
    reference = with_ftfy if fix_text(prompt) == prompt else without_ftfy
    ref_tensor, ref_ids = reference([prompt])
    assert tok.encode(prompt) == ref_ids[0]
    assert torch.equal(tok([prompt]), ref_tensor)


def test_batch_equals_openclip(tok, openclip):
    ref_tensor, _ = openclip[1](PROMPTS)
    ours = tok(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), CONTEXT_LENGTH)
    assert torch.equal(ours, ref_tensor)
    assert tok([]).shape == (0, CONTEXT_LENGTH)


@pytest.mark.parametrize("prompt", ["cafÃ© au lait", "“curly quotes”", "ﬁne ＦＵＬＬ width"])
def test_ftfy_gap_is_documented(tok, openclip, prompt):
    with_ftfy, without_ftfy, _, _ = openclip
    ours = tok([prompt])
    assert torch.equal(ours, without_ftfy([prompt])[0])
    assert not torch.equal(ours, with_ftfy([prompt])[0])


def test_layout_and_pad_is_zero(tok):
    row = tok(["a cat"])[0].tolist()
    assert row[:4] == [SOT, 320, 2368, EOT]  # "a</w>" 320, "cat</w>" 2368
    assert row[4:] == [PAD] * (CONTEXT_LENGTH - 4) and PAD == 0
    assert tok([""])[0].tolist() == [SOT, EOT] + [0] * (CONTEXT_LENGTH - 2)


def test_truncation_keeps_eot_last(tok):
    ids = tok.encode("lung " * 100)
    assert len(ids) == 100  # encode does not truncate
    row = tok(["lung " * 100])[0].tolist()
    assert row == [SOT] + ids[:75] + [EOT]
    assert row[76] == EOT and PAD not in row
    # 75 words fit exactly: no truncation, EOT is already at 76; 76 words lose their last word.
    assert tok(["lung " * 75])[0].tolist() == [SOT] + ids[:75] + [EOT]
    assert tok(["lung " * 76])[0].tolist() == [SOT] + ids[:75] + [EOT]


def test_placeholder_expansion():
    tok = Tokenizer()
    first = tok.add_placeholder("<chexpert>", 4)
    second = tok.add_placeholder("<pcam>", 2)
    assert first == [49408, 49409, 49410, 49411] and second == [49412, 49413]
    assert tok.placeholders == {"<chexpert>": first, "<pcam>": second}
    prompt = "a chest x-ray in the style of <chexpert>, next to <pcam><chexpert>"
    expected = tok.encode("a chest x-ray in the style of") + first + tok.encode(", next to") + second + first
    assert tok.encode(prompt) == expected
    row = tok([prompt])[0].tolist()
    start = row.index(first[0])
    assert row[start:start + 4] == first and row[:start] == [SOT] + tok.encode("a chest x-ray in the style of")
    assert row[1:len(expected) + 2] == expected + [EOT] and max(row) == second[-1]
    # Exact, case-sensitive match on the raw text; a different case is ordinary text.
    assert tok.encode("<CheXpert>") == Tokenizer().encode("<chexpert>")
    assert not set(tok.encode("<CheXpert>")) & set(first)
    # Glued to words, and inside a batch of other prompts.
    assert tok.encode("x<pcam>y") == tok.encode("x") + second + tok.encode("y")
    batch = tok(["a cat", "<pcam>"])
    assert batch[1, :4].tolist() == [SOT, *second, EOT] and batch[0, :4].tolist() == [SOT, 320, 2368, EOT]


def test_placeholder_longest_match_wins():
    tok = Tokenizer()
    short = tok.add_placeholder("<a>", 1)
    long = tok.add_placeholder("<a>b", 1)
    assert tok.encode("<a>b <a>") == long + short


@pytest.mark.parametrize("name, reason", [
    ("", "empty"), ("   ", "empty"), ("cat", "vocabulary"), ("Cat", "vocabulary"), ("!", "vocabulary"),
    ("<end_of_text>", "vocabulary"),
])
def test_placeholder_refusals(name, reason):
    with pytest.raises(ValueError, match=reason):
        Tokenizer().add_placeholder(name, 1)


def test_placeholder_refuses_duplicates_and_zero_vectors():
    tok = Tokenizer()
    tok.add_placeholder("<x-ray-style>", 2)
    with pytest.raises(ValueError, match="already registered"):
        tok.add_placeholder("<x-ray-style>", 2)
    with pytest.raises(ValueError, match="n_vectors"):
        tok.add_placeholder("<other>", 0)
    assert tok.add_placeholder("catdogfish", 1) == [49410]  # several vocabulary pieces: allowed


def hf_clip_tokenizer():
    from transformers import CLIPTokenizer

    # As the SD2 hub tokenizer, pad_token "!" (id 0); our vocab names the specials the OpenCLIP way.
    folder = weights_dir()
    return CLIPTokenizer(vocab=str(folder / "clip_vocab.json"), merges=str(folder / "clip_merges.txt"),
                         bos_token="<start_of_text>", eos_token="<end_of_text>", unk_token="<end_of_text>",
                         pad_token="!")


def test_transformers_clip_tokenizer_agrees_except_bang(tok):
    hf = hf_clip_tokenizer()

    def hf_ids(texts):
        return torch.tensor(hf(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids)

    # transformers applies NFC and no html.unescape: compare on prompts where neither matters, and without "!".
    same = [p for p in PROMPTS if "!" not in p and "&" not in p and unicodedata.normalize("NFC", p) == p]
    assert len(same) >= 25
    assert torch.equal(hf_ids(same), tok(same))
    # The quirk: its pad token "!" is an added token, so every literal "!" becomes id 0 (OpenCLIP: "!!" -> 748).
    assert hf_ids(["Hello!!"])[0, :5].tolist() == [SOT, 3306, 0, 0, EOT]
    assert tok(["Hello!!"])[0, :4].tolist() == [SOT, 3306, 748, EOT]
