"""Per-architecture configs of the tiny random-weight MoE models.

Its own module so that each architecture's quirks sit in one place, apart from
the code that builds, quantizes and saves the models
(:mod:`hobbit_mlx.testing.tiny_models`): ``TINY_ARCHS`` (verified end to end),
``UNVERIFIED_ARCHS``, ``SKIPPED_ARCHS`` (with the reason), ``REQUIRED_ARCHS``,
the Hugging Face per-expert weight names ``HF_PER_EXPERT_ARCHS`` and
:func:`tiny_config`.

Every dimension that mlx-lm quantizes (the input dimension of each Linear /
SwitchLinear / Embedding) is a multiple of 64, so that with the default
``group_size=64`` all of them, including the routed experts, get quantized.

Quirks found while writing the configs (mlx-lm 0.32, transformers 5):

* transformers' ``AutoTokenizer`` always parses config.json, so configs must
  also be valid for transformers (jamba: no ``layers_block_type``, it is a
  read-only property there; minimax_m3_vl: sparse layers are named
  ``minimax_m3_sparse``; muse_spark needs an ``audio_config``).
* deepseek_v2 requires a ``rope_scaling`` dict, hunyuan ``rope_scaling.alpha``,
  mistral4 ``rope_parameters.llama_4_scaling_beta``.
* Some models keep some layers unquantized through ``Model.quant_predicate``
  (MoEGate matrices of deepseek-style routers are not Linears; bailing_moe_v3
  keeps attention/embeddings in float; muse_spark quantizes the experts of all
  but the first and last layers).
* In HF checkpoints, qwen3_next stores zero-centred norms and (C, 1, K)
  convs; mlx-lm's sanitize shifts/moves them back when it sees HF experts.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import mlx.core as mx

from .tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------

H = 64  # hidden size
MOE_I = 64  # routed expert intermediate size
DENSE_I = 128  # dense MLP intermediate size
N_EXPERTS = 8
TOP_K = 2


def _common(**kw) -> dict:
    cfg = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": DENSE_I,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    cfg.update(kw)
    return cfg


TINY_ARCHS: Dict[str, Dict[str, Any]] = {
    "mixtral": _common(
        model_type="mixtral",
        intermediate_size=MOE_I,  # experts use intermediate_size
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
    ),
    "phimoe": _common(
        model_type="phimoe",
        intermediate_size=MOE_I,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        rope_scaling=None,
        rms_norm_eps=1e-5,
    ),
    "granitemoe": _common(
        model_type="granitemoe",
        intermediate_size=MOE_I,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        logits_scaling=2.0,
        attention_multiplier=0.25,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_bias=False,
        tie_word_embeddings=True,
    ),
    "qwen2_moe": _common(
        model_type="qwen2_moe",
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_I,
        shared_expert_intermediate_size=DENSE_I,
    ),
    "qwen3_moe": _common(
        model_type="qwen3_moe",
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_I,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    ),
    "olmoe": _common(
        model_type="olmoe",
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        intermediate_size=MOE_I,
        norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
    "deepseek_v2": _common(
        model_type="deepseek_v2",
        num_hidden_layers=3,
        num_key_value_heads=4,
        moe_intermediate_size=MOE_I,
        n_routed_experts=N_EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
        routed_scaling_factor=1.0,
        kv_lora_rank=64,
        q_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=64,
        v_head_dim=64,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        # deepseek_v2.py requires a (yarn) rope_scaling dict.
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
    "deepseek_v3": _common(
        model_type="deepseek_v3",
        num_hidden_layers=3,
        num_key_value_heads=4,
        moe_intermediate_size=MOE_I,
        n_routed_experts=N_EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
        routed_scaling_factor=2.5,
        kv_lora_rank=64,
        q_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=64,
        v_head_dim=64,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
    ),
    "gpt_oss": _common(
        model_type="gpt_oss",
        intermediate_size=MOE_I,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        rms_norm_eps=1e-5,
    ),
    "glm4_moe": _common(
        model_type="glm4_moe",
        num_hidden_layers=3,
        moe_intermediate_size=MOE_I,
        n_routed_experts=N_EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        rope_scaling=None,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
    ),
    "llama4": {
        "model_type": "llama4",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "text_config": _common(
            model_type="llama4_text",
            num_hidden_layers=4,  # layer 3 uses global (NoPE) attention
            intermediate_size=MOE_I,  # expert size
            intermediate_size_mlp=DENSE_I,  # dense layers
            interleave_moe_layer_step=1,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=1,
            attention_bias=False,
            attention_chunk_size=16,
            use_qk_norm=True,
            rope_scaling=None,
        ),
    },
}

# Additional archs (routed experts are SwitchGLU/SwitchMLP), verified end to
# end like the required ones above.
TINY_ARCHS.update(
    {
        "dots1": _common(
            model_type="dots1",
            num_hidden_layers=3,
            first_k_dense_replace=1,
            moe_intermediate_size=MOE_I,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            n_group=2,
            topk_group=1,
            scoring_func="noaux_tc",
        ),
        "Klear": _common(
            model_type="Klear",
            attention_bias=False,
            mlp_only_layers=[0],
            num_hidden_layers=3,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            decoder_sparse_step=1,
            n_shared_experts=1,
            moe_intermediate_size=MOE_I,
            norm_topk_prob=True,
        ),
        "deepseek": _common(
            model_type="deepseek",
            num_hidden_layers=3,
            num_key_value_heads=4,
            moe_intermediate_size=MOE_I,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            num_experts_per_tok=TOP_K,
            first_k_dense_replace=1,
            moe_layer_freq=1,
        ),
        "ernie4_5_moe": _common(
            model_type="ernie4_5_moe",
            num_hidden_layers=3,
            use_bias=False,
            moe_num_experts=N_EXPERTS,
            moe_k=TOP_K,
            moe_intermediate_size=MOE_I,
            moe_layer_start_index=1,
            moe_layer_interval=1,
            moe_num_shared_experts=1,
            moe_gate_act="softmax",
        ),
        "hunyuan": _common(
            model_type="hunyuan",
            attention_bias=False,
            moe_topk=TOP_K,
            num_experts=N_EXPERTS,
            num_shared_expert=1,
            use_mixed_mlp_moe=True,
            use_qk_norm=True,
            use_cla=False,
            cla_share_factor=2,
            moe_intermediate_size=MOE_I,
            # hunyuan.py requires rope_scaling["alpha"] (DynamicNTKAlphaRoPE)
            rope_scaling={"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
            tie_word_embeddings=True,
        ),
        "bailing_moe": _common(
            model_type="bailing_moe",
            num_hidden_layers=3,
            moe_intermediate_size=MOE_I,
            num_experts=N_EXPERTS,
            num_shared_experts=1,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            use_qk_norm=True,
            use_bias=False,
            use_qkv_bias=False,
            norm_head=False,
            partial_rotary_factor=0.5,
            moe_router_enable_expert_bias=True,
            score_function="sigmoid",
            routed_scaling_factor=2.5,
            n_group=2,
            topk_group=1,
        ),
        "minimax": _common(
            model_type="minimax",
            intermediate_size=MOE_I,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            shared_intermediate_size=0,
            rotary_dim=8,
            scoring_func="sigmoid",
            use_qk_norm=True,
        ),
        "glm4_moe_lite": _common(
            model_type="glm4_moe_lite",
            num_hidden_layers=3,
            num_key_value_heads=4,
            moe_intermediate_size=MOE_I,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            num_experts_per_tok=TOP_K,
            routed_scaling_factor=1.8,
            kv_lora_rank=64,
            q_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=64,
            v_head_dim=64,
            first_k_dense_replace=1,
            num_nextn_predict_layers=0,
        ),
        "exaone_moe": _common(
            model_type="exaone_moe",
            num_hidden_layers=4,
            moe_intermediate_size=MOE_I,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            num_shared_experts=1,
            sliding_window=16,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
            is_moe_layer=[False, True, True, True],
        ),
        "afmoe": _common(
            model_type="afmoe",
            num_hidden_layers=3,
            moe_intermediate_size=MOE_I,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            num_shared_experts=1,
            num_dense_layers=1,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=16,
            route_norm=True,
            route_scale=2.0,
            score_func="sigmoid",
            mup_enabled=True,
        ),
    }
)

_QWEN3_NEXT_TEXT = dict(
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    full_attention_interval=2,  # layer 0: gated delta net, layer 1: attention
    num_experts=N_EXPERTS,
    num_experts_per_tok=TOP_K,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_intermediate_size=MOE_I,
    shared_expert_intermediate_size=MOE_I,
    norm_topk_prob=True,
)

TINY_ARCHS.update(
    {
        "qwen3_next": _common(
            model_type="qwen3_next", partial_rotary_factor=0.25, **_QWEN3_NEXT_TEXT
        ),
        "qwen3_5_moe": {
            "model_type": "qwen3_5_moe",
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "tie_word_embeddings": False,
            "text_config": _common(
                model_type="qwen3_5_moe_text",
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [1, 1, 2],
                },
                **_QWEN3_NEXT_TEXT,
            ),
        },
    }
)

TINY_ARCHS.update(
    {
        "step3p5": _common(
            model_type="step3p5",
            num_hidden_layers=3,  # layer 0 dense, layers 1-2 MoE
            num_attention_groups=2,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            partial_rotary_factors=[0.5, 1.0, 0.5],
            use_head_wise_attn_gate=True,
            moe_num_experts=N_EXPERTS,
            moe_top_k=TOP_K,
            moe_intermediate_size=MOE_I,
            share_expert_dim=MOE_I,
            moe_router_scaling_factor=3.0,
            norm_expert_weight=True,
            swiglu_limits=[0.0, 7.0, 7.0],
            swiglu_limits_shared=[0.0, 16.0, 16.0],
        ),
        "lfm2_moe": _common(
            model_type="lfm2_moe",
            num_hidden_layers=3,
            moe_intermediate_size=MOE_I,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            use_expert_bias=True,
            num_dense_layers=1,
            norm_eps=1e-5,
            conv_bias=False,
            conv_L_cache=3,
            layer_types=["conv", "full_attention", "conv"],
        ),
        "jamba": _common(
            model_type="jamba",
            num_hidden_layers=4,
            # layers_block_type is derived by mlx-lm ([mamba, attention] * 2);
            # writing it into config.json breaks transformers' JambaConfig
            # (read by AutoTokenizer), where it is a read-only property.
            attn_layer_offset=1,
            attn_layer_period=2,
            expert_layer_offset=1,
            expert_layer_period=2,  # layers 1 and 3 are MoE
            mamba_d_conv=4,
            mamba_d_state=16,
            mamba_expand=2,
            mamba_dt_rank=64,  # so that dt_proj is quantizable too
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            intermediate_size=MOE_I,
            tie_word_embeddings=False,
        ),
        "granitemoehybrid": _common(
            model_type="granitemoehybrid",
            layer_types=["mamba", "attention"],
            intermediate_size=MOE_I,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            shared_intermediate_size=DENSE_I,
            embedding_multiplier=4.0,
            attention_multiplier=0.25,
            logits_scaling=2.0,
            residual_multiplier=0.5,
            attention_bias=False,
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_n_groups=1,
            mamba_proj_bias=False,
            mamba_conv_bias=True,
            position_embedding_type="rope",
            tie_word_embeddings=True,
        ),
        "nemotron_h": _common(
            model_type="nemotron_h",
            hybrid_override_pattern=["M", "E", "*", "E"],
            attention_bias=False,
            mamba_num_heads=4,
            mamba_head_dim=16,
            mamba_proj_bias=False,
            ssm_state_size=16,
            conv_kernel=4,
            n_groups=1,
            mlp_bias=False,
            layer_norm_epsilon=1e-5,
            use_bias=False,
            use_conv_bias=True,
            moe_intermediate_size=MOE_I,
            moe_shared_expert_intermediate_size=MOE_I,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            num_experts_per_tok=TOP_K,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    }
)

TINY_ARCHS.update(
    {
        "mimo_v2_flash": _common(
            model_type="mimo_v2_flash",
            num_hidden_layers=3,
            hybrid_layer_pattern=[0, 1, 1],  # 1 = sliding window attention
            moe_layer_freq=[0, 1, 1],  # 1 = MoE layer
            add_swa_attention_sink_bias=True,
            add_full_attention_sink_bias=False,
            sliding_window_size=16,
            moe_intermediate_size=MOE_I,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            v_head_dim=32,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=16,
            swa_v_head_dim=16,
            swa_rope_theta=10000.0,
            partial_rotary_factor=0.5,
            n_shared_experts=None,
            n_routed_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            routed_scaling_factor=None,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            n_group=1,
            topk_group=1,
            layernorm_epsilon=1e-5,
        ),
        "longcat_flash": {
            k: v
            for k, v in _common(
                model_type="longcat_flash",
                num_layers=2,
                attention_method="MLA",
                zero_expert_type="identity",
                zero_expert_num=2,
                ffn_hidden_size=DENSE_I,
                expert_ffn_hidden_size=MOE_I,
                moe_topk=TOP_K,
                n_routed_experts=N_EXPERTS,
                kv_lora_rank=64,
                q_lora_rank=64,
                qk_rope_head_dim=16,
                qk_nope_head_dim=64,
                v_head_dim=64,
                routed_scaling_factor=6.0,
                mla_scale_q_lora=True,
                mla_scale_kv_lora=True,
                attention_bias=False,
                norm_topk_prob=False,
                router_bias=False,
            ).items()
            if k not in ("num_hidden_layers", "intermediate_size", "head_dim")
        },
        "kimi_linear": _common(
            model_type="kimi_linear",
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            qk_nope_head_dim=64,
            qk_rope_head_dim=16,
            v_head_dim=64,
            kv_lora_rank=64,
            mla_use_nope=True,
            linear_attn_config={
                "kda_layers": [1, 3],  # 1-based; layer 2 is MLA
                "full_attn_layers": [2],
                "num_heads": 2,
                "head_dim": 64,
                "short_conv_kernel_size": 4,
            },
            model_max_length=4096,
            num_experts=N_EXPERTS,
            num_experts_per_token=TOP_K,
            moe_intermediate_size=MOE_I,
            num_shared_experts=1,
            moe_router_activation_func="sigmoid",
            moe_renormalize=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            use_grouped_topk=True,
            num_expert_group=1,
            topk_group=1,
        ),
    }
)

TINY_ARCHS.update(
    {
        "solar_open": _common(
            model_type="solar_open",  # mlx-lm reuses glm4_moe.Model
            num_hidden_layers=3,
            moe_intermediate_size=MOE_I,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            num_experts_per_tok=TOP_K,
            routed_scaling_factor=1.0,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            partial_rotary_factor=1.0,
            use_qk_norm=False,
        ),
        "mellum": _common(
            model_type="mellum",
            num_hidden_layers=3,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=MOE_I,
            norm_topk_prob=True,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "laguna": _common(
            model_type="laguna",
            num_hidden_layers=3,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            num_attention_heads_per_layer=[4, 8, 8],
            sliding_window=16,
            gating=True,
            qkv_bias=False,
            attention_bias=False,
            partial_rotary_factor=0.5,
            rope_parameters={
                "full_attention": {
                    "rope_type": "default",
                    "rope_theta": 500000.0,
                    "partial_rotary_factor": 0.5,
                },
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 1.0,
                },
            },
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=MOE_I,
            shared_expert_intermediate_size=MOE_I,
            moe_routed_scaling_factor=2.5,
            moe_router_logit_softcapping=0.0,
            moe_router_score_func="sigmoid",
        ),
        "phixtral": {
            "model_type": "phixtral",
            "num_vocab": VOCAB_SIZE,
            "model_dim": H,
            "num_heads": 4,
            "num_layers": 2,
            "rotary_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": TOP_K,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
        },
    }
)

_BAILING_COMMON = dict(
    num_hidden_layers=3,
    layer_group_size=2,  # layer 0: linear attention, layers 1-2: full/MLA
    group_norm_size=4,
    moe_intermediate_size=MOE_I,
    moe_shared_expert_intermediate_size=MOE_I,
    num_experts=N_EXPERTS,
    num_shared_experts=1,
    num_experts_per_tok=TOP_K,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    use_qk_norm=True,
    score_function="sigmoid",
    moe_router_enable_expert_bias=True,
)

_MLA_DIMS = dict(
    kv_lora_rank=64,
    q_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=64,
    v_head_dim=64,
)

TINY_ARCHS.update(
    {
        "bailing_moe_linear": _common(
            model_type="bailing_moe_linear",
            partial_rotary_factor=0.5,
            **_BAILING_COMMON,
        ),
        "bailing_hybrid": _common(
            model_type="bailing_hybrid",
            num_key_value_heads=4,
            partial_rotary_factor=0.5,
            **_MLA_DIMS,
            **_BAILING_COMMON,
        ),
        # config.json says model_type "bailing_hybrid"; mlx-lm remaps it to
        # bailing_moe_v3 through the "architectures" entry.
        "bailing_moe_v3": _common(
            model_type="bailing_hybrid",
            architectures=["BailingMoeV3ForCausalLM"],
            num_key_value_heads=4,
            head_dim=32,
            num_attention_heads=2,
            short_conv_kernel_size=4,
            kda_lower_bound=-5.0,
            kda_safe_gate=True,
            no_kda_lora=True,
            rope_interleave=True,
            **_MLA_DIMS,
            **_BAILING_COMMON,
        ),
    }
)

_DSV3_MOE = dict(
    num_hidden_layers=3,
    num_key_value_heads=4,
    moe_intermediate_size=MOE_I,
    n_routed_experts=N_EXPERTS,
    n_shared_experts=1,
    num_experts_per_tok=TOP_K,
    routed_scaling_factor=2.5,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    **_MLA_DIMS,
)

_DSA_INDEXER = dict(
    index_head_dim=32,
    index_n_heads=2,
    index_topk=4,  # small, so the sparse-attention path is exercised
)

TINY_ARCHS.update(
    {
        "deepseek_v32": _common(
            model_type="deepseek_v32", **_DSA_INDEXER, **_DSV3_MOE
        ),
        "glm_moe_dsa": _common(
            model_type="glm_moe_dsa",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=False,
            **_DSA_INDEXER,
            **_DSV3_MOE,
        ),
        "mistral4": _common(
            model_type="mistral4",
            rope_parameters={
                "type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
            **_DSV3_MOE,
        ),
        "gemma4_text": _common(
            model_type="gemma4_text",
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            num_kv_shared_layers=0,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=VOCAB_SIZE,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1000000.0,
                    "rope_type": "proportional",
                },
                "sliding_attention": {
                    "partial_rotary_factor": 1.0,
                    "rope_theta": 10000.0,
                    "rope_type": "default",
                },
            },
            final_logit_softcapping=30.0,
            use_double_wide_mlp=False,
            enable_moe_block=True,
            num_experts=N_EXPERTS,
            top_k_experts=TOP_K,
            moe_intermediate_size=MOE_I,
            tie_word_embeddings=True,
        ),
    }
)

_TOKEN_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}

# Vision-language checkpoints whose mlx-lm module is text-only (sanitize drops
# the vision tower): config.json holds only text_config, no vision_config.
TINY_ARCHS.update(
    {
        "qwen3_vl_moe": {
            "model_type": "qwen3_vl_moe",
            **_TOKEN_IDS,
            "text_config": dict(
                TINY_ARCHS["qwen3_moe"], model_type="qwen3_vl_moe_text"
            ),
        },
        "kimi_k25": {
            "model_type": "kimi_k25",
            **_TOKEN_IDS,
            "text_config": _common(model_type="kimi_k2", **_DSV3_MOE),
        },
        "minimax_m3_vl": {
            "model_type": "minimax_m3_vl",
            **_TOKEN_IDS,
            "text_config": _common(
                model_type="minimax_m3",
                num_hidden_layers=3,
                intermediate_size=MOE_I,  # routed experts
                dense_intermediate_size=DENSE_I,
                shared_intermediate_size=MOE_I,
                num_local_experts=N_EXPERTS,
                num_experts_per_tok=TOP_K,
                mlp_layer_types=["dense", "sparse", "sparse"],
                # mlx-lm: any type but full_attention is sparse; transformers
                # (AutoTokenizer reads config.json) validates the names.
                layer_types=["full_attention", "minimax_m3_sparse", "full_attention"],
                rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                routed_scaling_factor=2.0,
                use_qk_norm=True,
                use_gemma_norm=True,
                sparse_attention_config={
                    "sparse_num_index_heads": 2,
                    "sparse_index_dim": 32,
                    "sparse_block_size": 2,
                    "sparse_topk_blocks": 2,
                    "sparse_local_block": 1,
                },
            ),
        },
    }
)

TINY_ARCHS.update(
    {
        "kimi_k3": {
            "model_type": "kimi_k3",
            **_TOKEN_IDS,
            "text_config": _common(
                model_type="kimi_linear",
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=2,
                hidden_act="situ",
                activation_situ_beta=10.0,
                attn_res_block_size=2,
                linear_attn_config={
                    "kda_layers": [1, 3],  # 1-based; layer 2 is MLA
                    "full_attn_layers": [2],
                    "num_heads": 2,
                    "head_dim": 64,
                    "short_conv_kernel_size": 4,
                },
                q_lora_rank=64,
                kv_lora_rank=64,
                qk_nope_head_dim=64,
                qk_rope_head_dim=16,
                v_head_dim=64,
                mla_use_nope=True,
                mla_use_output_gate=True,
                num_experts=N_EXPERTS,
                num_experts_per_token=TOP_K,
                num_shared_experts=1,
                moe_intermediate_size=MOE_I,
                routed_scaling_factor=2.5,
                first_k_dense_replace=1,
                routed_expert_hidden_size=H,  # latent MoE (down/up around experts)
                latent_moe_use_norm=True,
            ),
        },
    }
)

TINY_ARCHS.update(
    {
        "deepseek_v41": _common(
            model_type="deepseek_v41",
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=64,
            q_lora_rank=64,
            qk_rope_head_dim=16,
            o_groups=2,
            o_lora_rank=64,
            moe_intermediate_size=MOE_I,
            n_routed_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            scoring_func="sqrtsoftplus",
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            swiglu_limit=10.0,
            rms_norm_eps=1e-6,
            sliding_window=16,
            # layer 1 attends over 4x-compressed KV blocks picked by an indexer
            compress_ratios=[0, 4],
            kv_source_layer_ids=[1],
            index_source_layer_ids=[1],
            index_n_heads=2,
            index_head_dim=32,
            index_topk=2,
            hc_mult=4,
            hc_sinkhorn_iters=4,
        ),
    }
)

TINY_ARCHS["longcat_flash_ngram"] = dict(
    TINY_ARCHS["longcat_flash"],
    model_type="longcat_flash_ngram",
    hidden_size=128,  # 2 n-gram embedders of width 64
    ngram_vocab_size_ratio=2,
    emb_neighbor_num=2,
    emb_split_num=2,
)

TINY_ARCHS.update(
    {
        "gemma4": {
            "model_type": "gemma4",
            **_TOKEN_IDS,
            "vocab_size": VOCAB_SIZE,
            "text_config": TINY_ARCHS["gemma4_text"],
        },
        "mistral3": {
            "model_type": "mistral3",
            **_TOKEN_IDS,
            "text_config": TINY_ARCHS["mistral4"],
        },
        "kimi_vl": {
            "model_type": "kimi_vl",
            **_TOKEN_IDS,
            "text_config": _common(model_type="deepseek_v3", **_DSV3_MOE),
        },
    }
)

# Archs from mlx_lm/models whose routed experts are SwitchGLU/SwitchMLP but
# that are not offered here, with the reason.
SKIPPED_ARCHS: Dict[str, str] = {
    "muse_spark": (
        "its layers call Metal-only kernels (mlx_lm.kernels.norm_add_norm "
        "etc., mx.fast.metal_kernel without CPU fallback), so a forward pass "
        "cannot be verified with CPU-only MLX.  It is not in TINY_ARCHS, but "
        "its config is in UNVERIFIED_ARCHS and make_tiny_model builds, "
        "quantizes and saves it (mlx_lm.load works; running it needs Metal)"
    ),
    "dbrx": (
        "routed experts are a Python list of per-expert MLPs, not "
        "SwitchGLU/SwitchMLP"
    ),
}

# Configs that build, quantize, save and mlx_lm.load fine but whose forward
# pass could not be verified here (see SKIPPED_ARCHS).  make_tiny_model and
# tiny_config accept them too.
UNVERIFIED_ARCHS: Dict[str, Dict[str, Any]] = {
    "muse_spark": {
        "model_type": "muse_spark",
        **_TOKEN_IDS,
        "text_config": _common(
            # mlx-lm quantizes the experts of all but the first and last
            # layers (Model.quant_predicate), so layers 1 and 2 are quantized.
            num_hidden_layers=4,
            post_norm_eps=1e-5,
            rope_parameters={"rope_theta": 10000.0},
            layer_rope_theta=[10000.0, 10000.0, 10000.0, 0.0],  # 0: no RoPE
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            sliding_window=16,
            final_logit_softcapping=30.0,
            output_multiplier=1.0,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_hidden_size=H,  # experts run at this (compressed) width
            moe_intermediate_size=MOE_I,
            routed_scaling_factor=1.0,
            num_shared_experts=0,
        ),
        # Not used by mlx-lm; transformers (AutoTokenizer parses config.json)
        # requires audio_config.out_hidden_size == text_config.hidden_size.
        "audio_config": {"out_hidden_size": H},
    },
}

# The architectures every consumer of this module can rely on.
REQUIRED_ARCHS = (
    "mixtral",
    "phimoe",
    "granitemoe",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "glm4_moe",
    "llama4",
)


def tiny_config(arch: str, config_overrides: Optional[dict] = None) -> dict:
    """A deep copy of ``TINY_ARCHS[arch]`` with ``config_overrides`` merged in.

    Overrides are merged recursively into nested dicts: archs with a nested
    ``text_config`` (llama4, qwen3_5_moe, kimi_k25, ...) take e.g.
    ``{"text_config": {"num_hidden_layers": 3}}``.
    """
    if arch in TINY_ARCHS:
        cfg = copy.deepcopy(TINY_ARCHS[arch])
    elif arch in UNVERIFIED_ARCHS:
        cfg = copy.deepcopy(UNVERIFIED_ARCHS[arch])
    else:
        raise ValueError(
            f"Unknown tiny arch {arch!r}; choose one of {sorted(TINY_ARCHS)}"
        )

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    if config_overrides:
        merge(cfg, config_overrides)
    return cfg


def _vocab_size(config: dict) -> int:
    return (
        config.get("vocab_size")
        or config.get("num_vocab")  # phixtral
        or config.get("text_config", {}).get("vocab_size", VOCAB_SIZE)
    )


# ---------------------------------------------------------------------------
# HF per-expert checkpoints
# ---------------------------------------------------------------------------

# Per arch (mlx-lm module name): how the routed experts are named in the
# Hugging Face checkpoint.  An expert linear ``{P}.{child}.weight`` (P = path of
# the SwitchGLU/SwitchMLP) becomes
# ``{parent(P)}.{experts}.{e}.{names.get(child, child)}.weight``.  MLA
# attention (embed_q/unembed_out) is written back as ``kv_b_proj`` unless
# ``mla`` is False.  ``fixup`` adapts other weights to the HF layout.
# Every entry is verified: mlx_lm.load on the HF checkpoint reproduces the
# logits of the float mlx-form model.
_W123 = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _qwen3_next_fixup(weights: Dict[str, mx.array]) -> None:
    # HF Qwen3-Next uses zero-centred RMSNorm weights and (C, 1, K) convs;
    # mlx-lm's sanitize adds 1 / moves the axis when it sees HF experts.
    norm_keys = (
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    )
    for k, v in list(weights.items()):
        if "conv1d.weight" in k and v.shape[-1] == 1:
            weights[k] = v.moveaxis(2, 1)
        elif v.ndim == 1 and any(k.endswith(sfx) for sfx in norm_keys):
            weights[k] = v - 1.0


HF_PER_EXPERT_ARCHS: Dict[str, Dict[str, Any]] = {
    "mixtral": {"names": _W123},
    "phimoe": {"names": _W123},
    "minimax": {"names": _W123},
    "lfm2_moe": {"names": _W123},
    "nemotron_h": {"names": {"fc1": "up_proj", "fc2": "down_proj"}},
    "phixtral": {"experts": "mlp"},
    "qwen3_next": {"fixup": _qwen3_next_fixup},
    "kimi_vl": {"mla": False},
    **{
        a: {}
        for a in (
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "deepseek",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "glm4_moe",
            "glm4_moe_lite",
            "glm_moe_dsa",
            "dots1",
            "Klear",
            "ernie4_5_moe",
            "hunyuan",
            "bailing_moe",
            "bailing_moe_linear",
            "bailing_hybrid",
            "bailing_moe_v3",
            "mellum",
            "laguna",
            "longcat_flash",
            "longcat_flash_ngram",
            "mimo_v2_flash",
            "afmoe",
            "exaone_moe",
            "jamba",
            "mistral4",
            "mistral3",
            "kimi_k25",
        )
    },
}
