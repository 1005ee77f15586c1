#!/usr/bin/env bash
# test_import_hf.sh — `moegen import-hf`: every family's config.json in tests/import_hf/ (made by
# make_configs.py from the transformers configuration classes) imported, validated by `moegen check`
# (the round trip) and its canonical form checked for the family's routing; released configs
# compared with the shipped spec of the same model (every field but name, source and
# description); the tensor-mapping comments; refusals and --approximate; missing keys (all named
# at once), wrong types and malformed JSON (line:col); names, dtypes and the output file.
# Needs MOEGEN_BINARY and MOEGEN_SOURCE_DIR (set by CTest).
set -u
moegen=${MOEGEN_BINARY:?}
src=${MOEGEN_SOURCE_DIR:?}
configs=$src/tests/import_hf
work=$(mktemp -d /tmp/moegen-import-hf-XXXXXX)
trap 'rm -rf "$work"' EXIT
. "$(dirname "$0")/check_lib.sh"

# import_check LABEL STEM [options]: import tests/import_hf/STEM.json into $work/STEM.yaml, then
# `moegen check` it; the canonical form is left in $canon, import-hf's stderr in $import_out.
import_check() {
    local label=$1 stem=$2
    shift 2
    expect "$label: import-hf" 0 "$moegen" import-hf "$configs/$stem.json" -o "$work/$stem.yaml" "$@"
    import_out=$out
    expect "$label: the import validates (moegen check)" 0 "$moegen" check "$work/$stem.yaml"
    canon=$out
}
# has LABEL LINE...: each LINE is a whole line of the canonical form ("  key: value" under a section).
has() {
    local label=$1 line
    shift
    for line in "$@"; do
        if printf '%s\n' "$canon" | grep -qxF -- "$line"; then pass "$label: $line"; else fail "$label: '$line' not in: $canon"; fi
    done
}
# yaml_has LABEL STEM TEXT...: the imported YAML file contains each TEXT, in its keys or in its
# comments (whose lines are joined again where they were wrapped).
yaml_has() {
    local label=$1 stem=$2 text flat
    shift 2
    flat=$(sed -e 's/^# *//' "$work/$stem.yaml" | tr '\n' ' ' | tr -s ' ')
    for text in "$@"; do
        if printf '%s' "$flat" | grep -qF -- "$text"; then pass "$label: YAML has '$text'"; else fail "$label: '$text' not in $work/$stem.yaml"; fi
    done
}
one_line() {
    local lines
    lines=$(printf '%s\n' "$out" | wc -l)
    if [ "$lines" -eq 1 ]; then pass "$1: the error is one line"; else fail "$1: the error has $lines lines: $out"; fi
}

expect "import-hf --help" 0 "$moegen" import-hf --help
contains "import-hf --help shows usage" "usage: moegen import-hf CONFIG"
expect "moegen --help lists import-hf" 0 "$moegen" --help
contains "moegen --help lists import-hf" "import-hf CONFIG"

# ---- every family ---------------------------------------------------------------------------
import_check mixtral mixtral
has mixtral "num_experts: 8" "num_experts_per_tok: 2" "hidden_size: 4096" "moe_intermediate_size: 14336" \
    "activation: swiglu" "dtype: bf16" "  score_function: softmax" "  order: softmax_then_topk" \
    "  norm_topk_prob: true" "  mode: dropless" "  count: 0"
yaml_has mixtral mixtral "block_sparse_moe.gate.weight" "block_sparse_moe.experts.{e}.w1.weight [F, H] (gate)" \
    "block_sparse_moe.experts.{e}.w3.weight [F, H] (up)" "experts.{e}.w2.weight [H, F]" \
    "rows [0, F) and the up projection in rows [F, 2F)" "mlp.experts.gate_up_proj [E, 2F, H] is w1 as it is" \
    'source: "' 'description: "Imported from a Hugging Face config.json (model_type mixtral). Keys used:' \
    "num_local_experts 8" "name: mixtral"

import_check minimax minimax
has minimax "num_experts: 8" "num_experts_per_tok: 2" "  order: softmax_then_topk" "  norm_topk_prob: true"

import_check qwen2_moe qwen2_moe
has qwen2_moe "num_experts: 60" "num_experts_per_tok: 4" "moe_intermediate_size: 1408" "  score_function: softmax" \
    "  order: softmax_then_topk" "  norm_topk_prob: false" "  count: 1" "  intermediate_size: 5632" "  gate: true"
yaml_has qwen2_moe qwen2_moe "mlp.experts.{e}.gate_proj.weight" "mlp.experts.{e}.up_proj.weight" \
    "mlp.shared_expert.gate_proj.weight" "shared_gate [H] fp32 <- model.layers.{L}.mlp.shared_expert_gate.weight [1, H]"

import_check qwen3_moe qwen3_moe
has qwen3_moe "num_experts: 128" "num_experts_per_tok: 8" "moe_intermediate_size: 768" "  order: softmax_then_topk" \
    "  norm_topk_prob: false" "  count: 0"

import_check qwen3_next qwen3_next
has qwen3_next "num_experts: 512" "num_experts_per_tok: 10" "moe_intermediate_size: 512" "  norm_topk_prob: true" \
    "  count: 1" "  intermediate_size: 512" "  gate: true"

import_check olmoe olmoe
has olmoe "num_experts: 64" "num_experts_per_tok: 8" "moe_intermediate_size: 2048" "  order: softmax_then_topk" \
    "  norm_topk_prob: false" "  count: 0"

import_check "deepseek_v2 (group_limited_greedy)" deepseek_v2
has deepseek_v2 "num_experts: 160" "num_experts_per_tok: 6" "moe_intermediate_size: 1536" "  score_function: softmax" \
    "  order: softmax_then_topk" "  norm_topk_prob: false" "  routed_scaling_factor: 16.0" "  n_group: 8" \
    "  topk_group: 3" "  group_score: max" "  count: 1" "  intermediate_size: 3072" "  gate: false"
yaml_has deepseek_v2 deepseek_v2 "mlp.shared_experts.gate_proj.weight"

import_check "deepseek_v2 lite (greedy)" deepseek_v2_lite
has deepseek_v2_lite "num_experts: 64" "num_experts_per_tok: 6" "  n_group: 1" "  routed_scaling_factor: 1.0" \
    "  norm_topk_prob: false" "  count: 1" "  intermediate_size: 2816"

import_check deepseek_v3 deepseek_v3
has deepseek_v3 "num_experts: 256" "num_experts_per_tok: 8" "  score_function: sigmoid" "  score_bias: true" \
    "  norm_topk_prob: true" "  routed_scaling_factor: 2.5" "  n_group: 8" "  topk_group: 4" "  group_topm: 2" \
    "  group_score: topm_sum" "  group_mask: neg_inf" "  count: 1" "  intermediate_size: 2048"
yaml_has deepseek_v3 deepseek_v3 "score_bias [E] fp32 <- model.layers.{L}.mlp.gate.e_score_correction_bias [E]"

import_check glm4_moe glm4_moe
has glm4_moe "num_experts: 128" "num_experts_per_tok: 8" "moe_intermediate_size: 1408" "  score_function: sigmoid" \
    "  score_bias: true" "  n_group: 1" "  norm_topk_prob: true" "  count: 1" "  intermediate_size: 1408"

expect "gpt_oss: refused without --approximate" 1 "$moegen" import-hf "$configs/gpt_oss.json" -o "$work/refused.yaml"
contains "gpt_oss: the refusal names the clamped SwiGLU" "clamped SwiGLU (swiglu_limit 7"
contains "gpt_oss: the refusal points at --approximate" "--approximate writes the closest spec"
one_line "gpt_oss refusal"
if [ -e "$work/refused.yaml" ]; then fail "gpt_oss: a refused import wrote its output"; else pass "gpt_oss: a refused import writes nothing"; fi
import_check "gpt_oss --approximate" gpt_oss --approximate
has gpt_oss "num_experts: 128" "num_experts_per_tok: 4" "hidden_size: 2880" "moe_intermediate_size: 2880" \
    "activation: swiglu" "expert_bias: true" "  order: topk_then_softmax" "  norm_topk_prob: false" \
    "  router_bias: true"
if printf '%s' "$import_out" | grep -qF "moegen: import-hf: warning: $configs/gpt_oss.json: approximate spec: activation swiglu has no clamps"; then
    pass "gpt_oss --approximate: warns on stderr"
else
    fail "gpt_oss --approximate: no warning: $import_out"
fi
yaml_has gpt_oss gpt_oss "APPROXIMATE (written with --approximate)" "swiglu has no clamps" \
    "router_b [E] fp32 <- model.layers.{L}.mlp.router.bias [E]" "gate and up interleaved" \
    "w1[e][f] = row 2f (gate), w1[e][F + f] = row 2f + 1 (up)" "gate_up_proj_bias" "down_proj_bias"

import_check "llama4 (multimodal: text_config)" llama4
has llama4 "num_experts: 16" "num_experts_per_tok: 1" "hidden_size: 5120" "moe_intermediate_size: 8192" \
    "weight_on_input: true" "  score_function: sigmoid" "  norm_topk_prob: false" "  count: 1" \
    "  intermediate_size: 8192" "  gate: false"
yaml_has llama4 llama4 "text_config.num_local_experts 16" \
    "language_model.model.layers.{L}.feed_forward.experts.gate_up_proj [E, H, 2F]" \
    "language_model.model.layers.{L}.feed_forward.shared_expert.gate_proj.weight"
import_check llama4_text llama4_text
has llama4_text "num_experts: 16" "num_experts_per_tok: 1" "weight_on_input: true" "  score_function: sigmoid" "  count: 1"
yaml_has llama4_text llama4_text "<- model.layers.{L}.feed_forward.router.weight"

import_check granitemoe granitemoe
has granitemoe "num_experts: 8" "num_experts_per_tok: 2" "moe_intermediate_size: 11008" "  order: topk_then_softmax" \
    "  count: 0"
yaml_has granitemoe granitemoe "block_sparse_moe.input_linear.weight [E, 2F, H] as it is"
import_check granitemoeshared granitemoeshared
has granitemoeshared "num_experts: 8" "  order: topk_then_softmax" "  count: 0"
import_check granitemoehybrid granitemoehybrid
has granitemoehybrid "num_experts: 8" "  order: topk_then_softmax" "  count: 1" "  intermediate_size: 1024" "  gate: false"
yaml_has granitemoehybrid granitemoehybrid "shared_mlp.input_linear.weight"

expect "phimoe: refused without --approximate" 1 "$moegen" import-hf "$configs/phimoe.json"
contains "phimoe: the refusal names sparsemixer" "sparsemixer"
import_check "phimoe --approximate" phimoe --approximate
has phimoe "num_experts: 16" "num_experts_per_tok: 2" "moe_intermediate_size: 6400" "  order: topk_then_softmax"
yaml_has phimoe phimoe "APPROXIMATE (written with --approximate)"

import_check dbrx dbrx
has dbrx "num_experts: 4" "num_experts_per_tok: 1" "hidden_size: 2048" "moe_intermediate_size: 3584" \
    "  order: softmax_then_topk" "  norm_topk_prob: true"
yaml_has dbrx dbrx "ffn_config.moe_num_experts 4" "transformer.blocks.{L}.ffn.experts.mlp.w1" "ffn.experts.mlp.v1"

import_check jamba jamba
has jamba "num_experts: 16" "num_experts_per_tok: 2" "moe_intermediate_size: 14336" "  order: softmax_then_topk" \
    "  norm_topk_prob: false"
yaml_has jamba jamba "model.layers.{L}.feed_forward.router.weight"

expect "ernie4_5_moe: refused without --approximate" 1 "$moegen" import-hf "$configs/ernie4_5_moe.json"
contains "ernie4_5_moe: the refusal names the selection bias" "selection-only bias (moe_statics.e_score_correction_bias)"
import_check "ernie4_5_moe --approximate" ernie4_5_moe --approximate
has ernie4_5_moe "num_experts: 64" "num_experts_per_tok: 6" "moe_intermediate_size: 1536" "  norm_topk_prob: true" \
    "  count: 1" "  intermediate_size: 3072"

# ---- released configs against the shipped specs ----------------------------------------------
for pair in real-mixtral-8x7b:mixtral-8x7b real-deepseek-v3:deepseek-v3 real-qwen3-30b-a3b:qwen3-30b-a3b \
    real-olmoe-1b-7b:olmoe-1b-7b real-qwen1.5-moe-a2.7b:qwen1.5-moe-a2.7b; do
    stem=${pair%%:*}
    spec=${pair#*:}
    import_check "$stem" "$stem"
    imported=$(printf '%s\n' "$canon" | grep -v -e '^name: ' -e '^# sha256: ')
    expect "$spec: the shipped spec validates" 0 "$moegen" check "$src/specs/$spec.yaml"
    shipped=$(printf '%s\n' "$out" | grep -v -e '^name: ' -e '^# sha256: ')
    if [ -n "$imported" ] && [ "$imported" = "$shipped" ]; then
        pass "$stem: the import equals specs/$spec.yaml (every field but name, source, description)"
    else
        fail "$stem: the import differs from specs/$spec.yaml: $(diff <(printf '%s\n' "$imported") <(printf '%s\n' "$shipped"))"
    fi
done
yaml_has real-deepseek-v3 real-deepseek-v3 "fp8 (quantization_config.quant_method fp8)" "topk_method noaux_tc"
import_check "real-gpt-oss-20b --approximate" real-gpt-oss-20b --approximate
has real-gpt-oss-20b "num_experts: 32" "num_experts_per_tok: 4" "  router_bias: true" "expert_bias: true"
yaml_has real-gpt-oss-20b real-gpt-oss-20b "MXFP4"

# ---- output, names, dtypes ----------------------------------------------------------------------
"$moegen" import-hf "$configs/qwen3_moe.json" > "$work/stdout.yaml" 2> "$work/stderr.txt"
if [ $? -eq 0 ] && [ ! -s "$work/stderr.txt" ] && cmp -s "$work/stdout.yaml" "$work/qwen3_moe.yaml"; then
    pass "without -o the spec goes to stdout, byte for byte what -o writes"
else
    fail "stdout import differs from -o or wrote to stderr: $(cat "$work/stderr.txt")"
fi
"$moegen" import-hf "$configs/qwen3_moe.json" > "$work/again.yaml"
if cmp -s "$work/stdout.yaml" "$work/again.yaml"; then pass "the import is deterministic"; else fail "two imports differ"; fi
if ls "$work"/*.tmp.* > /dev/null 2>&1; then fail "temporary files left: $(ls "$work")"; else pass "-o leaves no temporary file"; fi

sed 's/"model_type"/"_name_or_path": "mistralai\/Mixtral-8x7B-Instruct v0.1\/",\n  "model_type"/' \
    "$configs/mixtral.json" > "$work/named.json"
expect "_name_or_path gives the name" 0 "$moegen" import-hf "$work/named.json"
contains "_name_or_path is sanitized to the name grammar" "name: mixtral-8x7b-instruct-v0.1"
sed 's/"model_type"/"_name_or_path": "\/models\/70B",\n  "model_type"/' "$configs/mixtral.json" > "$work/digit.json"
expect "a name that would start with a digit" 0 "$moegen" import-hf "$work/digit.json"
contains "a name starts with a letter" "name: hf-70b"
expect "-n sets the name" 0 "$moegen" import-hf "$work/named.json" -n my.layer_1
contains "-n sets the name" "name: my.layer_1"
expect "-n with a bad name is refused" 1 "$moegen" import-hf "$configs/mixtral.json" -n "8x7b"
contains "-n with a bad name says why" "is not a spec name"

expect "--dtype overrides the config" 0 "$moegen" import-hf "$configs/mixtral.json" --dtype fp32
contains "--dtype fp32" "dtype: fp32"
expect "--dtype with a bad value" 1 "$moegen" import-hf "$configs/mixtral.json" --dtype float32
grep -v '"dtype"' "$configs/mixtral.json" > "$work/nodtype.json"
expect "no dtype in the config: bf16 with a warning" 0 "$moegen" import-hf "$work/nodtype.json"
contains "no dtype: the warning" "warning: $work/nodtype.json: no torch_dtype or dtype in the config: dtype bf16"
contains "no dtype: bf16" "dtype: bf16"
sed 's/"dtype": "bfloat16"/"torch_dtype": "float16"/' "$configs/mixtral.json" > "$work/fp16.json"
expect "torch_dtype float16" 0 "$moegen" import-hf "$work/fp16.json"
contains "torch_dtype float16 is fp16" "dtype: fp16"
sed 's/"dtype": "bfloat16"/"torch_dtype": "float8_e4m3fn"/' "$configs/mixtral.json" > "$work/fp8.json"
expect "a dtype moegen lacks is refused" 1 "$moegen" import-hf "$work/fp8.json"
contains "a dtype moegen lacks: the message" "torch_dtype 'float8_e4m3fn' has no moegen dtype"

sed 's/"silu"/"gelu"/' "$configs/mixtral.json" > "$work/gelu.json"
expect "hidden_act gelu" 0 "$moegen" import-hf "$work/gelu.json"
contains "hidden_act gelu on gated experts is geglu" "activation: geglu"
sed 's/"silu"/"gelu_pytorch_tanh"/' "$configs/mixtral.json" > "$work/tanh.json"
expect "tanh GELU refused" 1 "$moegen" import-hf "$work/tanh.json"
contains "tanh GELU: the message" "hidden_act gelu_pytorch_tanh (tanh-approximated GELU)"
expect "tanh GELU with --approximate" 0 "$moegen" import-hf "$work/tanh.json" --approximate
contains "tanh GELU approximated by geglu" "activation: geglu"
sed 's/"silu"/"relu"/' "$configs/mixtral.json" > "$work/relu.json"
expect "gated relu refused even with --approximate" 1 "$moegen" import-hf "$work/relu.json" --approximate
contains "gated relu: the message" "hidden_act relu on gated experts"
sed 's/"hidden_size": 4096/"hidden_size": 4100/' "$configs/mixtral.json" > "$work/h4100.json"
expect "a layer moegen cannot build" 1 "$moegen" import-hf "$work/h4100.json"
contains "a layer moegen cannot build: the spec rule" "not one moegen can build: hidden_size: 4100 is not a multiple of 16"
one_line "a layer moegen cannot build"

# ---- refused configs ---------------------------------------------------------------------------
printf '{"model_type": "llama", "hidden_size": 4096}\n' > "$work/llama.json"
expect "unknown model_type" 1 "$moegen" import-hf "$work/llama.json"
contains "unknown model_type: the message" "moegen: import-hf: $work/llama.json: unknown model_type 'llama'"
contains "unknown model_type: lists the families" "(known: mixtral,"
one_line "unknown model_type"
printf '{"hidden_size": 4096}\n' > "$work/notype.json"
expect "no model_type" 1 "$moegen" import-hf "$work/notype.json"
contains "no model_type: the message" "no model_type key"

printf '{"model_type": "deepseek_v3", "hidden_size": 7168, "num_experts_per_tok": null}\n' > "$work/missing.json"
expect "missing keys" 1 "$moegen" import-hf "$work/missing.json"
contains "missing keys: every one named at once" \
    "moegen: import-hf: $work/missing.json: missing keys for deepseek_v3: n_routed_experts (or num_local_experts), num_experts_per_tok (null), moe_intermediate_size"
one_line "missing keys"
printf '{"model_type": "mixtral",\n  "num_local_experts": 8,\n  "num_experts_per_tok": "2",\n  "hidden_size": 4096.0,\n  "intermediate_size": 14336}\n' > "$work/types.json"
expect "values of the wrong type" 1 "$moegen" import-hf "$work/types.json"
contains "wrong type: line:col of the first" "$work/types.json:3:26: num_experts_per_tok: expected an integer, found a string"
contains "wrong type: line:col of the second" "$work/types.json:4:18: hidden_size: expected an integer, found a number with a fraction or exponent"
one_line "values of the wrong type"
printf '{"model_type": "mixtral", "text_config": {}, "num_local_experts": 8}\n' > "$work/mixed.json"
expect "missing keys and a known family" 1 "$moegen" import-hf "$work/mixed.json"
contains "missing keys: the rest named" "num_experts_per_tok, hidden_size, intermediate_size"
printf '{"model_type": "llama4", "text_config": {"model_type": "llama4_text", "hidden_size": 5120}}\n' > "$work/l4.json"
expect "llama4: missing keys under text_config" 1 "$moegen" import-hf "$work/l4.json"
contains "llama4: missing keys named with text_config." "text_config.num_local_experts, text_config.num_experts_per_tok, text_config.intermediate_size"

# malformed JSON: line:col
check_json() { # LABEL CONTENT EXPECTED-MESSAGE
    printf "$2" > "$work/bad.json"
    expect "malformed JSON: $1" 1 "$moegen" import-hf "$work/bad.json"
    contains "malformed JSON: $1: line:col" "moegen: import-hf: $work/bad.json:$3"
    one_line "malformed JSON: $1"
}
check_json "a stray comma" '{"model_type": "mixtral",\n  "hidden_size": 4096,,\n}' "2:23: unexpected ',': expected a key in double quotes"
check_json "a trailing comma" '{"a": [1, 2,]}' "1:13: trailing comma before ']' is not JSON"
check_json "NaN" '{"a": NaN}' "1:7: NaN is not JSON"
check_json "an unterminated string" '{"a": "abc' "1:7: unterminated string"
check_json "a duplicate key" '{"a": 1,\n "b": 2,\n "a": 3}' "3:2: duplicate key \"a\" (first defined at line 1)"
check_json "a single-quoted key" "{'a': 1}" "1:2: single-quoted key"
check_json "a leading zero" '{"a": 007}' "1:7: a number with a leading zero is not JSON"
check_json "a bad escape" '{"a": "\\x"}' "1:8: unknown escape '\\x'"
check_json "a lone surrogate" '{"a": "\\udc00"}' "1:8: lone low surrogate"
check_json "invalid UTF-8" '{"a": "\377"}' "1:8: invalid UTF-8"
check_json "a comment" '{\n  // hidden size\n  "a": 1}' "2:3: comments are not JSON"
check_json "text after the value" '{"a": 1} {}' "1:10: unexpected '{': expected the end of the input"
check_json "Python literals" '{"a": True}' "1:7: True is Python, not JSON"
check_json "an empty file" '' "1:1: empty input"
check_json "nesting too deep" "$(printf '%0.s[' $(seq 1 70))" "1:65: nesting deeper than 64"
printf '[1, 2]' > "$work/array.json"
expect "a top level that is not an object" 1 "$moegen" import-hf "$work/array.json"
contains "a top level that is not an object: the message" "$work/array.json:1:1: the top level is an array, not an object"

expect "a missing config" 1 "$moegen" import-hf "$work/none.json"
contains "a missing config: the message" "moegen: import-hf: $work/none.json: No such file or directory"
expect "a directory as config" 1 "$moegen" import-hf "$work"
mkfifo "$work/fifo.json"
expect "a FIFO as config (refused, never a hang)" 1 timeout 10 "$moegen" import-hf "$work/fifo.json"
contains "a FIFO as config: the message" "not a regular file"
expect "no config argument" 1 "$moegen" import-hf
expect "an unknown option" 1 "$moegen" import-hf "$configs/mixtral.json" --frobnicate
expect "-o into a missing folder" 1 "$moegen" import-hf "$configs/mixtral.json" -o "$work/no/such/dir/x.yaml"
contains "-o into a missing folder: the message" "cannot write"

finish
