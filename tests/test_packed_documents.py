"""Packed documents (padding-free training): a block of documents with `seq_idx` (or `cu_seq_lens_q`) gives each
document the logits, the loss and the gradients it has alone, in float64; the first document continues a cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening, DynamicCache

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from training import data

from .conftest import TINY

# chunk_size 8: the starts 5, 8, 16, 27, 28, 30 fall inside chunks, on chunk edges, and one document has one token.
LENGTHS = [5, 3, 8, 11, 1, 2, 9]


def packed_model(**overrides) -> IteraLiteForCausalLM:
    return IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, **overrides})).double()


def packed_documents(lengths=LENGTHS):
    """The documents, their packing in one row, and that row's batch from `DataCollatorWithFlattening`."""
    docs = [torch.randint(3, TINY["vocab_size"], (1, n)) for n in lengths]
    batch = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)(
        [{"input_ids": d[0].tolist()} for d in docs]
    )
    return docs, batch


@torch.no_grad()
@pytest.mark.parametrize("boundary", ["seq_idx", "cu_seq_lens_q"])
def test_each_document_of_a_packed_row_gets_the_logits_it_has_alone(boundary):
    model = packed_model().eval()
    docs, batch = packed_documents()
    packed = model(batch["input_ids"], **{boundary: batch[boundary]}).logits
    alone = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(batch["input_ids"]).logits, alone)  # without boundaries, documents leak


def test_packed_loss_and_gradients_equal_the_documents_alone():
    """The loss over the packed row (labels -100 at each document start, as the collator gives them) is the
    token-weighted mean of the documents' own losses; its gradients of the embeddings and of every parameter equal
    those of the sum of the documents' losses. No aux loss here: the load-balancing loss is not a per-document sum."""
    model = packed_model(router_aux_loss_coef=0.0).train()
    # The fused loss keeps float64 (transformers' loss of the logits upcasts to fp32 at most), as the recipes train.
    model.fused_training_loss = True
    docs, batch = packed_documents()
    embeds = model.model.embed_tokens(batch["input_ids"]).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=batch["labels"], seq_idx=batch["seq_idx"])
    n_labels = (batch["labels"][:, 1:] != -100).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads_packed = torch.autograd.grad(out.loss * n_labels, [embeds, *params], allow_unused=True)

    pieces = embeds.detach().split(LENGTHS, dim=1)
    pieces = [p.clone().requires_grad_() for p in pieces]
    total = sum(
        model(inputs_embeds=p, labels=d).loss * (d.shape[1] - 1) for p, d in zip(pieces, docs) if d.shape[1] > 1
    )
    grads_alone = torch.autograd.grad(total, [*pieces, *params], allow_unused=True)
    torch.testing.assert_close(out.loss, total / n_labels, rtol=1e-10, atol=1e-12)
    # A one-token document predicts nothing: no gradient alone, and a zero one packed.
    grads_embeds = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads_alone, pieces)]
    torch.testing.assert_close(grads_packed[0], torch.cat(grads_embeds, 1), rtol=1e-8, atol=1e-10)
    for (name, _), g_packed, g_alone in zip(model.named_parameters(), grads_packed[1:], grads_alone[len(pieces) :]):
        if g_packed is None:
            assert g_alone is None, name
            continue
        # The norms compute in fp32 even in a float64 model, and a weight's gradient sums over the tokens in
        # another order packed than alone: fp32 rounding, as in the mixer's decode-equals-forward test.
        torch.testing.assert_close(g_packed, g_alone, rtol=1e-6, atol=1e-8, msg=f"gradient of {name}")


@torch.no_grad()
def test_the_first_packed_document_continues_the_cache_and_the_others_do_not():
    model = packed_model().eval()
    prefix = torch.randint(3, TINY["vocab_size"], (1, 6))
    docs, batch = packed_documents([7, 9, 4])
    cache = DynamicCache(config=model.config)
    model(prefix, cache=cache)
    packed = model(batch["input_ids"], cache=cache, seq_idx=batch["seq_idx"]).logits
    first = model(torch.cat([prefix, docs[0]], 1)).logits[:, prefix.shape[1] :]
    others = [model(d).logits for d in docs[1:]]
    torch.testing.assert_close(packed, torch.cat([first, *others], 1), rtol=1e-10, atol=1e-10)


def test_seq_idx_of_the_wrong_shape_and_a_batched_cu_seq_lens_are_errors():
    model = packed_model().eval()
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        model(torch.randint(3, 99, (1, 5)), seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seq_lens_q describes one flattened row"):
        model(torch.randint(3, 99, (2, 5)), cu_seq_lens_q=torch.tensor([0, 2, 5]))


def test_the_collator_marks_each_document_start_like_transformers_flattening():
    bos = 1
    docs = [[bos, 5, 6, 2], [bos, 7, 2], [bos, 8, 9, 10, 2]]
    row = [t for d in docs for t in d]
    batch = data.PackedDocumentsCollator(bos)([{"input_ids": row[2:]}, {"input_ids": row[:10]}])
    flat = DataCollatorWithFlattening(return_seq_idx=True)([{"input_ids": d} for d in docs])
    assert batch["labels"][1].tolist() == flat["labels"][0, :10].tolist()  # -100 at each <s>
    assert batch["seq_idx"][1].tolist() == (flat["seq_idx"][0, :10] + 1).tolist()  # same boundaries
    assert batch["seq_idx"][0].tolist()[:3] == [0, 0, 1]  # a block that starts mid-document: that one is index 0
    assert batch["seq_idx"].dtype == torch.int32 and batch["input_ids"].dtype == torch.long
