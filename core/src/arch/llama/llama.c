// The Llama decoder (Llama-2 / Llama-3 / TinyLlama shapes): hyperparameters and weights, and the text-only
// Llama entry of the architecture table. The graph is in decoder.c.
#include "arch/llama/llama.h"

#include "api/error.h"
#include "arch/arch.h"
#include "model/gguf_util.h"
#include "vocab/vocab.h"

#include "gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t vtrim_llama_read_hparams(struct vtrim_model * m, const struct gguf_context * g, const char * arch) {
    struct vtrim_text_hparams * hp = &m->text;
    char key[128];
#define KEY(suffix) (snprintf(key, sizeof key, "%s." suffix, arch), key)
    int32_t rc;
    if ((rc = vtrim_gguf_i32(g, KEY("embedding_length"), &hp->n_embd, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("block_count"), &hp->n_layer, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("feed_forward_length"), &hp->n_ff, true)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("attention.head_count"), &hp->n_head, true)) < 0) {
        return rc;
    }
    hp->n_head_kv = hp->n_head;
    hp->n_ctx_train = 4096;
    hp->rms_eps = 1e-5f;
    hp->rope_theta = 10000.0f;
    if ((rc = vtrim_gguf_i32(g, KEY("attention.head_count_kv"), &hp->n_head_kv, false)) < 0 ||
        (rc = vtrim_gguf_i32(g, KEY("context_length"), &hp->n_ctx_train, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, KEY("attention.layer_norm_rms_epsilon"), &hp->rms_eps, false)) < 0 ||
        (rc = vtrim_gguf_f32(g, KEY("rope.freq_base"), &hp->rope_theta, false)) < 0) {
        return rc;
    }
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_ff <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_embd % hp->n_head != 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_layer > 4096) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "invalid llama hyperparameters (n_embd=%d n_layer=%d n_head=%d n_head_kv=%d)",
                          hp->n_embd, hp->n_layer, hp->n_head, hp->n_head_kv);
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    hp->n_rot = hp->head_dim;
    if ((rc = vtrim_gguf_i32(g, KEY("rope.dimension_count"), &hp->n_rot, false)) < 0) {
        return rc;
    }
#undef KEY
    if (hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0 || !(hp->rope_theta > 0.0f)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "invalid rope parameters (dims %d, theta %g)", hp->n_rot, hp->rope_theta);
    }
    hp->n_vocab = vtrim_vocab_n_tokens(m->vocab);
    return 0;
}

int32_t vtrim_llama_bind_tensors(struct vtrim_model * m, const bool * foreign) {
    const struct vtrim_text_hparams * hp = &m->text;
    const int64_t n_embd = hp->n_embd, n_embd_kv = (int64_t) hp->head_dim * hp->n_head_kv;
    int32_t rc;
    if ((rc = vtrim_model_tensor(m, "token_embd.weight", n_embd, -1, 1, &m->tok_embd)) < 0 ||
        (rc = vtrim_model_tensor(m, "output_norm.weight", n_embd, 1, 1, &m->output_norm)) < 0) {
        return rc;
    }
    if (ggml_get_tensor(m->ctx_w, "output.weight")) {
        if ((rc = vtrim_model_tensor(m, "output.weight", n_embd, -1, 1, &m->output)) < 0) {
            return rc;
        }
    } else {
        m->output = m->tok_embd;   // tied embeddings
    }
    // Logits cover the output rows; the embedding may hold a few more (mllama), never fewer than the vocabulary.
    if (m->tok_embd->ne[1] < m->output->ne[1] || m->output->ne[1] > hp->n_vocab || m->output->ne[1] < 1) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "token_embd has %lld rows, output %lld, the vocabulary %d",
                          (long long) m->tok_embd->ne[1], (long long) m->output->ne[1], hp->n_vocab);
    }
    m->text.n_vocab = (int32_t) m->output->ne[1];
    m->rope_freqs = ggml_get_tensor(m->ctx_w, "rope_freqs.weight");
    if (m->rope_freqs && (m->rope_freqs->type != GGML_TYPE_F32 || m->rope_freqs->ne[0] != hp->n_rot / 2)) {
        return vtrim_fail(VTRIM_ERR_FORMAT, "rope_freqs.weight must be %d f32 values", hp->n_rot / 2);
    }
    m->layers = calloc((size_t) hp->n_layer, sizeof *m->layers);
    if (!m->layers) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int il = 0; il < hp->n_layer; il++) {
        struct vtrim_llama_layer * l = &m->layers[il];
        l->foreign = foreign && foreign[il];
        if ((rc = vtrim_model_tensorf(m, &l->attn_norm, n_embd, 1, "blk.%d.attn_norm.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->ffn_norm, n_embd, 1, "blk.%d.ffn_norm.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->ffn_gate, n_embd, hp->n_ff, "blk.%d.ffn_gate.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->ffn_up, n_embd, hp->n_ff, "blk.%d.ffn_up.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->ffn_down, hp->n_ff, n_embd, "blk.%d.ffn_down.weight", il)) < 0) {
            return rc;
        }
        if (l->foreign) {
            continue;
        }
        if ((rc = vtrim_model_tensorf(m, &l->wq, n_embd, n_embd, "blk.%d.attn_q.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->wk, n_embd, n_embd_kv, "blk.%d.attn_k.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->wv, n_embd, n_embd_kv, "blk.%d.attn_v.weight", il)) < 0 ||
            (rc = vtrim_model_tensorf(m, &l->wo, n_embd, n_embd, "blk.%d.attn_output.weight", il)) < 0) {
            return rc;
        }
    }
    return 0;
}

// ---- the text-only Llama entry ----

static const struct vtrim_chat_template k_no_templates[] = { { NULL, NULL, NULL, NULL } };

static int32_t text_read_hparams(struct vtrim_model * m, const struct gguf_context * text,
                                 const struct gguf_context * mmproj) {
    int32_t rc = vtrim_llama_read_hparams(m, text, "llama");
    m->image_token_id = -1;
    return rc < 0 ? rc : vtrim_arch_read_chat_template(m, text, "llava-1.5");
}

static int32_t text_bind_tensors(struct vtrim_model * m) { return vtrim_llama_bind_tensors(m, NULL); }

const struct vtrim_arch vtrim_arch_llama = {
    .name = "llama",
    .chat_templates = k_no_templates,
    .read_hparams = text_read_hparams,
    .bind_tensors = text_bind_tensors,
};
