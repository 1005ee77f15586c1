/* sha256.h — SHA-256 (FIPS 180-4), used for the canonical-spec hash and cache keys. */
#ifndef MOEGEN_GEN_SHA256_H
#define MOEGEN_GEN_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct moegen_sha256 {
    uint32_t state[8];
    uint64_t total_bytes;
    uint8_t block[64];
    size_t block_len;
} moegen_sha256;

void moegen_sha256_init(moegen_sha256 *h);
void moegen_sha256_update(moegen_sha256 *h, const void *data, size_t len);
void moegen_sha256_final(moegen_sha256 *h, uint8_t digest[32]);

/* One-shot digest as 64 lowercase hex characters plus NUL. */
void moegen_sha256_hex(const void *data, size_t len, char hex[65]);
/* Digest of an incremental hash as hex (finalizes h). */
void moegen_sha256_final_hex(moegen_sha256 *h, char hex[65]);

#endif
