"""Named configs in HF config.json layout. TINY runs anywhere in seconds (demo, notebooks, tests)."""

TINY = {
    "model_type": "qwen2_5_vl",
    "text_config": {
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": [4, 6, 6]},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    },
    "vision_config": {
        "depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128, "hidden_act": "silu",
        "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [1],
        "out_hidden_size": 128,
    },
    "image_token_id": 508, "video_token_id": 509, "vision_start_token_id": 506,
    "vision_end_token_id": 507, "tie_word_embeddings": True,
}
