/* fuzz_npy.c — libFuzzer target: bytes as an .npy file image. The reader must return
 * an array or an error, never crash or leak. */
#include <stdint.h>

#include "npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moegen_npy array;
    moegen_error err;
    if (moegen_npy_read_buffer("fuzz.npy", data, size, &array, &err) == MOEGEN_OK) moegen_npy_free(&array);
    return 0;
}
