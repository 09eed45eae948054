"""What a new user of `--method lora | unet`, DreamBooth and `--lora` met (a trial run of the README, December):
a flag that would have been silently ignored is refused in one line, an --out inside an input folder is refused,
class images left by a killed run with other settings are made again (and refused on --resume), and the LoRA
errors name flags of ours, not torch's arguments."""
import pytest

from medti.lora_files import LoRAFileError, read
from medti.loras import LoRAError, find


def test_a_tag_without_lora_dir_says_how_to_give_one():
    with pytest.raises(LoRAError) as e:
        find("missing", {}, [], "<lora:missing:1>")
    assert "no --lora-dir to look in: pass --lora-dir FOLDER (holding missing.safetensors)" in str(e.value)
    assert "(no --lora-dir given)" not in str(e.value)


def test_a_file_that_is_no_torch_file_gets_no_torch_advice(tmp_path):
    """torch.load's weights-only refusal advises `weights_only=False`, an argument no medti command has."""
    (tmp_path / "notes.pt").write_text('{"step": 1}\n')
    with pytest.raises(LoRAFileError) as e:
        read(tmp_path / "notes.pt", None)
    assert "not a readable LoRA file" in str(e.value) and "weights_only" not in str(e.value), str(e.value)
