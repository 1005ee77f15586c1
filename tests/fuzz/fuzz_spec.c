/* fuzz_spec.c — libFuzzer target: bytes -> spec loader. A spec that validates must have
 * a canonical form that parses back to the same hash; nothing may crash or leak. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "spec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_parse((const char *)data, size, "fuzz.yaml", &spec, &err) != MOEGEN_OK) return 0;
    char hash[65], again[65];
    moegen_spec_hash(&spec, hash);
    char *canonical = moegen_spec_canonical(&spec);
    if (canonical) {
        moegen_spec round_trip;
        if (moegen_spec_parse(canonical, strlen(canonical), "canonical", &round_trip, &err) != MOEGEN_OK) abort();
        moegen_spec_hash(&round_trip, again);
        if (strcmp(hash, again) != 0) abort();
        moegen_spec_free(&round_trip);
        free(canonical);
    }
    moegen_spec_free(&spec);
    return 0;
}
