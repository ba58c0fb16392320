"""Small real architectures with synthetic data, for checking curvkit (and a plugin) on the
models people train: Hugging Face GPT-2, BERT and Llama built from tiny configs (random
weights, never downloaded), ``nn.TransformerEncoder``, a ResNet with BatchNorm and an LSTM
classifier.

Each :class:`ModelCase` builds its model and a data set of its own (generated from a seed,
no network), says how to call the model and where its logits are, and computes its loss::

    from curvkit.testing.models import model_case

    case = model_case("gpt2")              # needs `transformers` for the HF models
    model = case.build()
    inputs, targets = case.data(64)
    loss = case.loss(model, inputs, targets)

The Hugging Face cases import ``transformers`` when built; :func:`available_cases` lists
the cases that can be built here. curvkit's own tests train every case with K-FAC, EKFAC,
SINGD and RS-KFAC, and docs/models.md lists what each parameter gets (built by
``benchmarks/models_table.py`` from :func:`coverage`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.stats.model_io import call_model, model_logits

__all__ = [
    "CASES",
    "ModelCase",
    "available_cases",
    "coverage",
    "markov_tokens",
    "model_case",
    "slice_inputs",
]

VOCAB = 24
SEQ_LEN = 10
CLASSES = 3


def markov_tokens(n: int, length: int, vocab: int = VOCAB, seed: int = 0) -> Tensor:
    """``(n, length)`` tokens from a fixed random first-order Markov chain (peaked
    transitions, so a language model can learn them)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = 6.0 * torch.randn(vocab, vocab, generator=gen, device="cpu")
    probs = logits.softmax(-1)
    tokens = torch.empty(n, length, dtype=torch.long, device="cpu")
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen, device="cpu")
    for t in range(1, length):
        tokens[:, t] = probs[tokens[:, t - 1]].multinomial(1, generator=gen).squeeze(1)
    return tokens


def _token_classes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random token sequences, labelled by the third of the vocabulary most of them fall in."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen, device="cpu")
    counts = torch.stack([((x * CLASSES) // VOCAB == c).sum(1) for c in range(CLASSES)], 1)
    return x, counts.argmax(1)


def _last_token_classes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random token sequences, labelled by the third of the vocabulary of their last token."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen, device="cpu")
    return x, (x[:, -1] * CLASSES) // VOCAB


def _first_token_classes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random token sequences, labelled by the third of the vocabulary of their first token."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen, device="cpu")
    return x, (x[:, 0] * CLASSES) // VOCAB


def slice_inputs(inputs: Any, index: Tensor | slice) -> Any:
    """Rows ``index`` of a tensor, or of every tensor in a mapping (dict inputs)."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


@dataclass(frozen=True)
class ModelCase:
    """A model with its data.

    Attributes:
        name: Short name (``"gpt2"``, ``"resnet"``, ...).
        description: One line for tables.
        build: A fresh float32 model (seeded, so every call gives the same weights).
        make_data: ``make_data(n, seed) -> (inputs, targets)``; inputs are a tensor or a
            dict of keyword arguments (Hugging Face models).
        needs: Import name of an optional package the case needs (``"transformers"``).
        language_model: The logits are ``(N, T, V)`` with targets ``(N, T)``.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    make_data: Callable[[int, int], tuple[Any, Tensor]]
    needs: str | None = None
    language_model: bool = False

    def data(self, n: int, seed: int = 0) -> tuple[Any, Tensor]:
        return self.make_data(n, seed)

    def logits(self, model: nn.Module, inputs: Any) -> Tensor:
        """The logits of ``model`` on ``inputs`` (``model(**inputs)`` for dict inputs; the
        ``"logits"`` entry of a ``ModelOutput``)."""
        return model_logits(call_model(model, inputs))

    def loss(self, model: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
        """Mean cross-entropy (over tokens for language models)."""
        return self.loss_of(self.logits(model, inputs), targets)

    def loss_of(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.language_model:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return F.cross_entropy(logits, targets)

    @property
    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


# --- Hugging Face models ------------------------------------------------------------------


def _lm_data(n: int, seed: int) -> tuple[Any, Tensor]:
    tokens = markov_tokens(n, SEQ_LEN + 1, seed=seed)
    return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    return _seeded(0, lambda: GPT2LMHeadModel(config))


def _bert_data(n: int, seed: int) -> tuple[Any, Tensor]:
    x, y = _first_token_classes(n, seed)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}, y


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(  # type: ignore[call-arg]  # num_labels goes to PretrainedConfig's **kwargs
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return _seeded(0, lambda: BertForSequenceClassification(config))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return _seeded(0, lambda: LlamaForCausalLM(config))


# --- torch models -------------------------------------------------------------------------


class TransformerClassifier(nn.Module):
    """Token and position embeddings, ``nn.TransformerEncoder`` (2 layers, batch first),
    mean over positions, a linear head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(SEQ_LEN, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        return self.head(self.encoder(self.tokens(x) + self.positions(pos)).mean(1))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, the shortcut a strided 1×1
    convolution with BatchNorm when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 8×8 one-channel images: stem, two basic blocks (the second strided),
    global average pooling, a linear head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _digits_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` of scikit-learn's 8×8 digits (shipped with it), standardised, in a seeded order."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(len(y), generator=gen, device="cpu")[:n]
    images = torch.as_tensor(X, dtype=torch.float32, device="cpu")[order].reshape(-1, 1, 8, 8)
    return (images - 4.9) / 6.0, torch.as_tensor(y, dtype=torch.long, device="cpu")[order]


class LSTMClassifier(nn.Module):
    """Embedding, a one-layer ``nn.LSTM`` (batch first), a two-layer MLP head on the last state."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


#: The cases by name.
CASES: dict[str, ModelCase] = {
    "gpt2": ModelCase(
        "gpt2",
        "HF GPT2LMHeadModel, 2 layers, d=16, wte tied to lm_head; next-token LM on a Markov chain",
        _gpt2,
        _lm_data,
        needs="transformers",
        language_model=True,
    ),
    "bert": ModelCase(
        "bert",
        "HF BertForSequenceClassification, 2 layers, d=16; dict inputs with attention_mask; class of the first token",
        _bert,
        _bert_data,
        needs="transformers",
    ),
    "llama": ModelCase(
        "llama",
        "HF LlamaForCausalLM, 2 layers, d=16, RMSNorm, no biases; next-token LM on a Markov chain",
        _llama,
        _lm_data,
        needs="transformers",
        language_model=True,
    ),
    "transformer_encoder": ModelCase(
        "transformer_encoder",
        "nn.TransformerEncoder classifier, 2 layers, d=16, token/position embeddings; majority class of the tokens",
        lambda: _seeded(0, TransformerClassifier),
        _token_classes,
    ),
    "resnet": ModelCase(
        "resnet",
        "ResNet (stem + 2 basic blocks, BatchNorm2d) on scikit-learn's 8×8 digits",
        lambda: _seeded(0, ResNet),
        _digits_images,
        needs="sklearn",
    ),
    "lstm": ModelCase(
        "lstm",
        "Embedding + nn.LSTM + MLP head; class of the last token",
        lambda: _seeded(0, LSTMClassifier),
        _last_token_classes,
    ),
}


def model_case(name: str) -> ModelCase:
    """The case called ``name`` (see :data:`CASES`)."""
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"no model case {name!r}; cases: {', '.join(CASES)}.") from None


def available_cases() -> list[str]:
    """Names of the cases whose optional package is installed."""
    return [name for name, case in CASES.items() if case.available]


_LINE = re.compile(r"^  (?P<name>\S+): (?P<what>.*)$")


def coverage(optimizer: Any, model: nn.Module) -> dict[str, tuple[str, str]]:
    """What ``optimizer.summary()`` says about each trainable parameter of ``model``.

    Reads the summary's lines (``  <block or parameter>: <description>``) and maps each
    trainable parameter (by its ``named_parameters`` name) to ``(name on the line,
    description)`` of the line that covers it: a block line covers the parameters of the
    block of that name (all rows of a parameter split into parts must be covered), a
    first-order line covers the block's parameters or the named parameter. A description
    starting with ``"first-order"`` means the parameter moves by the first-order rule.

    Raises:
        AssertionError: A trainable parameter no line covers, a line naming nothing, or a
            parameter covered by two lines that disagree on whether it is preconditioned.
    """
    pre = getattr(optimizer, "preconditioner", optimizer)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    by_block = {layer.name: layer for layer in pre.plan}
    rows_seen: dict[str, list[tuple[int, int]]] = {}
    found: dict[str, tuple[str, str]] = {}
    for line in optimizer.summary().splitlines()[1:]:
        match = _LINE.match(line)
        if match is None:
            continue
        name, what = match["name"], match["what"]
        if name in by_block:
            layer = by_block[name]
            refs = [layer.weight_ref] + ([layer.bias_ref] if layer.bias_ref is not None else [])
            for ref in refs:
                pname = names[id(ref.param)]
                if ref.rows is not None:
                    rows_seen.setdefault(pname, []).append(ref.rows)
                previous = found.get(pname)
                if previous is not None and _is_first_order(previous[1]) != _is_first_order(what):
                    raise AssertionError(f"parameter {pname!r} is both {previous[1]!r} and {what!r} in summary()")
                # a parameter split into parts (attention's q/k/v rows): every block's name
                found[pname] = (f"{previous[0]}, {name}" if previous is not None else name, what)
        elif name in names.values():
            found[name] = (name, what)
        elif name.startswith("distributed"):
            continue
        else:
            raise AssertionError(f"summary() line {line.strip()!r} names neither a block nor a parameter")
    for pname, rows in rows_seen.items():
        param = dict(model.named_parameters())[pname]
        covered = sorted(rows)
        stop = 0
        for start, end in covered:
            if start != stop:
                raise AssertionError(f"rows {stop}..{start} of {pname!r} are in no block of summary()")
            stop = end
        if stop != param.shape[0]:
            raise AssertionError(f"rows {stop}..{param.shape[0]} of {pname!r} are in no block of summary()")
    missing = sorted(set(names.values()) - set(found))
    if missing:
        raise AssertionError(f"summary() says nothing about trainable parameters {missing}")
    return {n: found[n] for n in names.values()}


def _is_first_order(description: str) -> bool:
    return description.startswith("first-order")
