/* fuzz_template.c — libFuzzer target: bytes as a template. Rendering must end in a
 * result or an error (syntax, sandbox, limits), never a crash, hang or leak. */
#include <stdint.h>
#include <stdlib.h>

#include "template.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moegen_template_file file = {"templates/fuzz.tpl", (const char *)data, size};
    moegen_template_set set = {&file, 1};
    moegen_params *params = moegen_params_new();
    if (!params) return 0;
    moegen_params *spec = moegen_params_table(params, "spec");
    if (spec) {
        moegen_params_int(spec, "num_experts", 8);
        moegen_params_str(spec, "dtype", "bf16");
        moegen_params_num(spec, "factor", 2.5);
    }
    moegen_render_limits limits = {8u << 20, 2000000, 1u << 20};
    char *out = NULL;
    size_t len = 0;
    moegen_error err;
    if (moegen_template_render(&set, "templates/fuzz.tpl", params, &limits, &out, &len, &err) == MOEGEN_OK)
        free(out);
    moegen_params_free(params);
    return 0;
}
