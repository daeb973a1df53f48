"""transformers' own common model tests (`ModelTesterMixin`), run against tiny lasp models of each token mixer and
a hybrid, the way transformers' model tests do (a model tester that builds a tiny config and inputs, one
`unittest.TestCase` per model).

The mixins are not in the transformers wheel and are not copied here: they are taken, at test time, from the
sdist of the installed transformers version (`pip download --no-deps --no-binary :all: transformers==<version>`),
cached under `.venv/transformers-tests/<version>/` (or `$LASP_TRANSFORMERS_TESTS`). If that download is impossible
the module is skipped, saying so.

What the sdist holds decides what runs. transformers' sdist ships only the top-level files of its `tests/` folder
(`test_modeling_common.py`, `test_pipeline_mixin.py`, ...), not `tests/generation/`, `tests/exporters/`,
`tests/pipelines/`, `tests/utils/` or `tests/causal_lm_tester.py`. So:
- `ModelTesterMixin` runs (from the sdist). It imports `GenerationTesterMixin` and subclasses `ExportTesterMixin`
  from the folders that are missing; where they are missing, empty stand-ins are written beside the extracted
  files so the module imports (those mixins then run nothing: see the skipped tests below).
- `GenerationTesterMixin` runs when the sdist has `tests/generation/test_utils.py`; otherwise its test class is
  skipped with that reason. This repository's own generation tests (tests/test_modeling_generation.py) cover
  greedy / sampling / beam search, padding, assisted and prompt-lookup decoding, export and compile.
- `PipelineTesterMixin` needs `tests/utils/tiny_model_summary.json` and `tests/pipelines/` (tiny models on the
  Hub): skipped with that reason when missing; a text-generation pipeline test below stands in.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import unittest
from unittest import mock

import pytest
import torch
import transformers
from lasp_hf import LaspConfig, LaspForCausalLM, LaspModel
from transformers.models.auto import modeling_auto

REPO = pathlib.Path(__file__).resolve().parents[1]
VERSION = transformers.__version__
CACHE = pathlib.Path(os.environ.get("LASP_TRANSFORMERS_TESTS", REPO / ".venv" / "transformers-tests")) / VERSION
PACKAGE = "transformers_sdist_tests"  # the sdist's tests/ folder, importable under this name

# Empty stand-ins for modules that test_modeling_common.py imports from folders the sdist does not ship.
STAND_INS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


def _sdist_tests() -> tuple[pathlib.Path | None, str]:
    """The extracted tests folder (a package named PACKAGE under the returned path), or None and why not."""
    package = CACHE / PACKAGE
    if (package / "test_modeling_common.py").exists():
        return CACHE, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = next(iter(CACHE.glob("transformers-*.tar.gz")), None)
    if archive is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"transformers=={VERSION}", "-d", str(CACHE)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(command[2:])}` timed out"
        archive = next(iter(CACHE.glob("transformers-*.tar.gz")), None)
        if result.returncode != 0 or archive is None:
            return None, f"`{' '.join(command[2:])}` failed: {result.stderr.strip()[-300:]}"
    prefix = f"transformers-{VERSION}/tests/"
    tmp = CACHE / (PACKAGE + ".partial")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    for folder in {tmp} | {p.parent for p in tmp.rglob("*.py")} | {(tmp / f).parent for f in STAND_INS}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").touch()
    for relative, text in STAND_INS.items():
        if not (tmp / relative).exists():
            (tmp / relative).write_text("# Stand-in: the transformers sdist does not ship this file.\n" + text)
    tmp.rename(package)  # appears under its final name only when complete
    return CACHE, ""


_ROOT, _WHY_NOT = _sdist_tests()
if _ROOT is None:
    pytest.skip(f"transformers' test mixins could not be taken from its sdist: {_WHY_NOT}", allow_module_level=True)
sys.path.insert(0, str(_ROOT))
common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
ModelTesterMixin = common.ModelTesterMixin
ids_tensor, random_attention_mask = common.ids_tensor, common.random_attention_mask
_generation = importlib.import_module(f"{PACKAGE}.generation.test_utils")
GenerationTesterMixin = _generation.GenerationTesterMixin
HAS_GENERATION_MIXIN = not (_ROOT / PACKAGE / "generation" / "test_utils.py").read_text().startswith("# Stand-in")


class LaspModelTester:
    """Tiny configs and inputs for the mixins (as transformers' CausalLMModelTester: hidden 32, 2 layers)."""

    def __init__(self, parent, token_mixer="lightning", layer_types=None, batch_size=2, seq_length=7):
        self.parent = parent
        self.token_mixer = token_mixer
        self.layer_types = layer_types
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 37
        self.pad_token_id = 0

    def get_config(self):
        return LaspConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            token_mixer=self.token_mixer,
            layer_types=self.layer_types,
            norm_type="rmsnorm",  # a weighted norm: the mixins check every parameter's gradient / init
            pad_token_id=self.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
            loss_chunk_size=8,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _LaspCommonTests(ModelTesterMixin, GenerationTesterMixin):
    """ModelTesterMixin (and GenerationTesterMixin when the sdist has it) on one tiny config. Skips below say why
    each one does not apply."""

    all_model_classes = (LaspModel, LaspForCausalLM)
    token_mixer, layer_types = "lightning", None
    # Linear-attention layers have no attention matrix (output_attentions gives None for them); the hybrid sets
    # this back to True.
    has_attentions = False

    def setUp(self):
        self.model_tester = LaspModelTester(self, self.token_mixer, self.layer_types)
        # The mixins find a model's role (base model, causal LM) in transformers' auto mappings, which list
        # transformers' own models only: list lasp there for the test, as `AutoModel.register` does for loading.
        for mapping, name in ((modeling_auto.MODEL_MAPPING_NAMES, "LaspModel"),
                              (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "LaspForCausalLM")):
            patcher = mock.patch.dict(mapping, {"lasp": name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_generation_tester_mixin_inheritance(self):
        if not HAS_GENERATION_MIXIN:
            self.skipTest(f"GenerationTesterMixin: tests/generation/test_utils.py is not in the transformers "
                          f"{VERSION} sdist (tests/test_modeling_generation.py covers generate)")
        super().test_generation_tester_mixin_inheritance()


class LaspLightningModelTest(_LaspCommonTests, unittest.TestCase):
    token_mixer = "lightning"


class LaspGatedModelTest(_LaspCommonTests, unittest.TestCase):
    token_mixer = "gated"


class LaspLinearModelTest(_LaspCommonTests, unittest.TestCase):
    token_mixer = "linear"


class LaspHybridModelTest(_LaspCommonTests, unittest.TestCase):
    # The softmax layer first: the mixins read the first layer's attention weights.
    token_mixer, layer_types = "gated", ["full_attention", "linear_attention"]
    has_attentions = True

    def test_attention_outputs(self):
        """transformers' version expects a matrix from every layer; a hybrid returns one per softmax layer and
        None per linear layer (as transformers' own hybrids): check that, with the shapes it checks."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        B, T, H = self.model_tester.batch_size, self.model_tester.seq_length, self.model_tester.num_attention_heads
        for model_class in self.all_model_classes:
            model = model_class._from_config(config, attn_implementation="eager").eval()
            with torch.no_grad():
                attentions = model(**inputs, output_attentions=True).attentions
            self.assertEqual(len(attentions), config.num_hidden_layers)
            for kind, weights in zip(config.layer_types, attentions, strict=True):
                if kind == "linear_attention":
                    self.assertIsNone(weights)
                else:
                    self.assertEqual(tuple(weights.shape), (B, H, T, T))
                    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))


@pytest.mark.skipif(
    not (_ROOT / PACKAGE / "utils" / "tiny_model_summary.json").exists(),
    reason=f"PipelineTesterMixin: tests/utils/tiny_model_summary.json and tests/pipelines/ are not in the "
    f"transformers {VERSION} sdist (its pipeline tests load tiny models from the Hub)",
)
def test_pipeline_mixin_imports():
    assert importlib.import_module(f"{PACKAGE}.test_pipeline_mixin").PipelineTesterMixin


@pytest.mark.parametrize("token_mixer, layer_types", [("lightning", None), ("gated", ["full_attention"] * 2)])
def test_text_generation_pipeline(token_mixer, layer_types, tmp_path):
    """The text-generation pipeline on a saved tiny model and a word-level tokenizer: its continuation is the
    model's own greedy decode of the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, pipeline

    words = [f"w{i}" for i in range(90)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    tester = LaspModelTester(None, token_mixer, layer_types)
    model = LaspForCausalLM(tester.get_config()).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    prompt = "w5 w6 w7 w5 w6"
    text = generator(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert text.split() == tokenizer.convert_ids_to_tokens(expected.tolist())
    json.dumps(text)  # a plain string
