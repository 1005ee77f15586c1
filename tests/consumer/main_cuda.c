/* main_cuda.c — a consumer of a CUDA layer generated at build time (tests/test_consumer.sh):
 * prints what the linked layer is and checks the host side that needs no GPU. */
#include <stdio.h>
#include <string.h>

#include "moe_consumer.h"

int main(void) {
    printf("linked: %s\n", moe_consumer_describe());
    printf("linked spec: %s\n", MOE_CONSUMER_SPEC_SHA256);
    const moegen_kernel_info *info = moe_consumer_info();
    printf("shape: E=%d k=%d H=%lld F=%lld\n", info->num_experts, info->top_k, (long long)info->hidden_size,
           (long long)info->ffn_size);
    moegen_kernel_outputs out;
    memset(&out, 0, sizeof out);
    moegen_kernel_args args;
    memset(&args, 0, sizeof args);
    args.abi_version = MOEGEN_KERNEL_ABI_VERSION;
    args.n_tokens = 4;
    args.out = &out;
    const int rc = moe_consumer_forward(&args, NULL); /* no tensors: refused before any launch */
    const int ok = moe_consumer_workspace_bytes(4) > 0 && rc == MOEGEN_KERNEL_EARG;
    printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
