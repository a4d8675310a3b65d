"""Fine-tuning a Hugging Face model directory (``save_pretrained`` output, offline): its weights through our
converter, its tokenizer saved with the run, LoRA on top, and the run reloading on its own."""

import pytest
import torch

import fused_kernels
from transformer.data.tokenizer import HFTokenizer, load_tokenizer
from transformer.training import checkpoint as ckpt
from transformer.training.trainer import TrainArgs, load_run, train

transformers = pytest.importorskip("transformers")

WORDS = ["return", "the", "a", "of", "file", "path", "string", "number", "list", "and", "to", "is", "in", "thread"]


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"], *".,()_"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    try:                                    # transformers 5 takes the vocabulary itself, 4 a vocab file
        tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    except TypeError:
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(str(directory))
    return directory


def test_the_tokenizer_of_a_hugging_face_directory_is_wrapped(hf_bert):
    tok = load_tokenizer(hf_bert)
    assert isinstance(tok, HFTokenizer) and tok.pad_id == 0 and tok.cls_id == 2 and tok.mask_id == 4
    assert tok.decode(tok.encode("return the path")) == "return the path"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_a_hugging_face_bert(tmp_path, hf_bert, method):
    out = tmp_path / method
    final = train(TrainArgs(task="bert-cls", preset="tiny", init=str(hf_bert), method=method, steps=3,
                            batch_size=8, eval_every=3, eval_batches=1, backend="torch", progress=False,
                            out=str(out)))
    config = ckpt.load_config(out)
    assert config["head"] == ["classifier.bias", "classifier.weight"]       # the pooler comes from the model
    assert config["model"]["dim"] == 32 and config["model"]["n_layers"] == 2
    hf = transformers.BertModel.from_pretrained(str(hf_bert))
    ours = ckpt.load_weights(out)
    embedding = hf.embeddings.word_embeddings.weight.detach()
    assert torch.equal(ours["bert.word_embed.weight"], embedding) == (method == "lora")
    task, model = load_run(str(out))                     # reloads alone: tokenizer saved under hf_tokenizer/
    assert isinstance(task.tokenizer, HFTokenizer) and (out / "hf_tokenizer").is_dir()
    with fused_kernels.use_backend("torch"), torch.no_grad():
        assert task.evaluate(model, 64)["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
