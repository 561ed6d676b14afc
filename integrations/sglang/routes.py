"""Every HTTP route of the supported SGLang servers, judged for one question: can it change the weights in place?

A route that can is answered by a hook while the weights are shared (owner or attached): `WRITES` names the
scheduler or weight-updater operation the hook sits on. Every other route is listed in `HARMLESS` with the reason
it leaves the weights alone; a route that exists only under a setting a sharing server refuses at start is in
`REFUSED_AT_START`. tests/with_sglang walks the installed SGLang's routes (the dumper's conditional one too) and
fails on any route in none of them, so a new SGLang's new endpoint is judged before the plugin claims to support it.
"""
from __future__ import annotations

# route -> the operation whose hook refuses it (or keeps the weights out of it) on a sharing server
WRITES: dict[str, str] = {
    "/update_weights_from_disk": "update_weights_from_disk",
    "/update_weights_from_tensor": "update_weights_from_tensor",
    "/update_weights_from_ipc": "update_weights_from_ipc",
    # 0.5.17: update_weights_from_distributed; 0.5.23: load_weights_from_distributed inside the same request
    "/update_weights_from_distributed": "update_weights_from_distributed|load_weights_from_distributed",
    "/begin_weight_update": "begin_weight_update",  # repacks quantized weights in place
    "/end_weight_update": "end_weight_update",
    "/weights_checker": "check_weights",  # reset_tensors writes; snapshot, compare and checksum only read
    # the weights tag would re-import the model's static state into the shared tensors on resume: it is taken
    # out of the request (the weights stay resident); KV cache and CUDA graph tags are released as asked
    "/release_memory_occupation": "release_memory_occupation",
    "/resume_memory_occupation": "resume_memory_occupation",
}

_INFERENCE = "runs the model: reads the weights"
_STATE = "reports the server's state"
_DOCS = "FastAPI's documentation pages"
_PROFILE = "profiling and logging switches: no weights"
_KV = "the KV cache and its storage tiers, not the weights"

HARMLESS: dict[str, str] = {
    **dict.fromkeys(("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"), _DOCS),
    **dict.fromkeys(("/ready", "/health", "/health_generate", "/get_model_info", "/model_info", "/get_server_info",
                     "/server_info", "/v1/models", "/v1/models/{model:path}", "/ping", "/", "/v1/loads",
                     "/get_remote_instance_transfer_engine_info", "/remote_instance_transfer_engine_info",
                     "/list_external_corpora", "/is_scaling_elastic_ep", "/get_hicache_l3_cache_layout",
                     "/api/tags", "/api/show", "/get_load"), _STATE),
    **dict.fromkeys(("/generate", "/encode", "/classify", "/v1/completions", "/v1/chat/completions",
                     "/v1/embeddings", "/v1/classify", "/v1/audio/transcriptions", "/v1/realtime", "/v1/score",
                     "/v1/decisions", "/v1/responses", "/v1/responses/{response_id}",
                     "/v1/responses/{response_id}/cancel", "/v1/rerank", "/api/chat", "/api/generate",
                     "/v1/messages", "/v1/messages/count_tokens", "/v1/systemone", "/invocations",
                     "/vertex_generate"), _INFERENCE),
    **dict.fromkeys(("/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize", "/parse_function_call",
                     "/separate_reasoning"), "tokenizer and output parsing: no model"),
    **dict.fromkeys(("/start_profile", "/stop_profile", "/set_trace_level", "/freeze_gc", "/configure_logging",
                     "/start_expert_distribution_record", "/stop_expert_distribution_record",
                     "/dump_expert_distribution_record"), _PROFILE),
    **dict.fromkeys(("/flush_cache", "/hicache/storage-backend", "/hicache/storage-backend/clear",
                     "/clear_hicache_storage_backend"), _KV),
    **dict.fromkeys(("/abort_request", "/pause_generation", "/continue_generation", "/slow_down", "/open_session",
                     "/close_session"), "schedules requests: no weights"),
    "/set_internal_state": "scheduler settings (server_args values), not tensors",
    "/get_weights_by_name": "reads a weight and returns a copy",
    "/init_weights_send_group_for_remote_instance": "a group to send this server's weights to another: reads them",
    "/send_weights_to_remote_instance": "sends this server's weights to another instance: reads them",
    "/init_weights_update_group": "a process group only; the update sent through it is refused "
                                  "(/update_weights_from_distributed)",
    "/destroy_weights_update_group": "tears the update group down",
    "/update_weight_version": "a version label, not the weights",
    **dict.fromkeys(("/get_weight_version", "/weight_version"), "0.5.17: deprecated, answers 404 and nothing else"),
    **dict.fromkeys(("/add_external_corpus", "/remove_external_corpus"),
                    "a token corpus for speculative lookup, kept beside the model"),
    **dict.fromkeys(("/load_lora_adapter", "/load_lora_adapter_from_tensors", "/unload_lora_adapter"),
                    "LoRA adapters live in their own memory pool; the base weights stay as loaded"),
    "/pd_role_switch": "switches prefill/decode role (needs --enable-pd-role-switch); the weights stay as loaded",
    "/scale_elastic_ep": "needs --elastic-ep-backend, which sharedcache does not support; SGLang refuses it without",
}


# routes that exist only under a setting with which a sharing server refuses to start
REFUSED_AT_START: dict[str, str] = {
    "/dumper/{method}": "only with DUMPER_SERVER_PORT=reuse: its configure takes a filter that every scheduler "
                        "evaluates as Python (code beside the weights); a sharing server refuses that variable at "
                        "start (compat.dumper_writes)",
}


def judged(path: str) -> str | None:
    """How sharedcache treats `path` on a sharing server (None: not judged yet)."""
    if path in WRITES:
        return f"hooked: {WRITES[path]}"
    if path in REFUSED_AT_START:
        return f"refused at start: {REFUSED_AT_START[path]}"
    return HARMLESS.get(path)
