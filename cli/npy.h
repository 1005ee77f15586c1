/* npy.h — NumPy .npy files for `moegen run --save DIR` and `--load DIR`.
 *
 * Users save the inputs, weights and outputs of a run as .npy files and load
 * tensors exported from NumPy or PyTorch (`np.save(path, t.numpy())`).
 *
 * Format (NumPy's "NPY" format):
 *   magic "\x93NUMPY", version major/minor bytes, a little-endian header length
 *   (2 bytes for version 1.0, 4 bytes for 2.0 and 3.0), then a Python dict literal
 *       {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
 *   padded with spaces and ended by '\n', then the raw C-order data.
 *
 * Writing: always version 1.0, byte for byte what np.save writes (including
 * NumPy's spare spaces after the dict so the first axis can grow), so the data
 * starts at a multiple of 64 bytes. Files are written atomically: to
 * "<path>.tmp.<pid>", fsync'd, then renamed over <path>.
 *
 * Reading: versions 1.0, 2.0 and 3.0. The header dict is parsed strictly (exactly
 * the three keys, each once, Python literal syntax) but tolerates any whitespace,
 * key order, single or double quotes, a trailing comma and Python 2's `3L`.
 * Only the six dtypes below are accepted, little-endian ('<', or '=' which means
 * little-endian on the hosts this builds for). Rejected, each with MOEGEN_ERR_IO
 * and a message "path: what is wrong": bad magic or version, a header length
 * beyond the file or over 1 MiB, a malformed dict, big-endian data, '|' on a multi-byte type,
 * object, structured, string or other dtypes, fortran_order True, negative dims,
 * more than MOEGEN_NPY_MAX_DIMS dims, a size that overflows, truncated data and
 * bytes after the data. Trailing bytes are an error on purpose: np.save writes
 * none, and a file holding several appended arrays must not load as its first.
 *
 * The parser never reads outside its input and never trusts a length before
 * checking it against the file size; it is meant to be fuzzed
 * (moegen_npy_read_buffer takes a file image in memory for that).
 */
#ifndef MOEGEN_CLI_NPY_H
#define MOEGEN_CLI_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOEGEN_NPY_MAX_DIMS 8

/* Element types, by their NumPy descr. U2 carries bfloat16 bits
 * (`t.view(torch.uint16).numpy()`), since NumPy has no bfloat16. */
typedef enum {
    MOEGEN_NPY_F4, /* '<f4' float32 */
    MOEGEN_NPY_F8, /* '<f8' float64 */
    MOEGEN_NPY_F2, /* '<f2' float16 */
    MOEGEN_NPY_U2, /* '<u2' uint16 (bfloat16 bits) */
    MOEGEN_NPY_I4, /* '<i4' int32 */
    MOEGEN_NPY_I8  /* '<i8' int64 */
} moegen_npy_dtype;

/* An array read from a file. `data` holds n_bytes of C-order, little-endian
 * elements, malloc'd; release with moegen_npy_free(). shape[ndim..7] are 0. */
typedef struct moegen_npy {
    moegen_npy_dtype dtype;
    int ndim;
    int64_t shape[MOEGEN_NPY_MAX_DIMS];
    void *data;
    size_t n_bytes;
} moegen_npy;

/* Write an array to `path` as a version 1.0 .npy file, atomically (a temporary
 * file beside it, fsync, rename). `data` holds the product of `shape` elements of
 * `dtype`, C order, host (little-endian) byte order.
 * Preconditions: path non-NULL; 0 <= ndim <= MOEGEN_NPY_MAX_DIMS; shape non-NULL
 * when ndim > 0, every dim >= 0; data non-NULL unless the array is empty.
 * Returns MOEGEN_OK; MOEGEN_ERR_INVALID_ARGUMENT for a precondition that fails,
 * an unknown dtype or a size that overflows; MOEGEN_ERR_IO when the file cannot
 * be created, written, synced or renamed (native_code = errno; the temporary file
 * is removed and an existing `path` is left as it was). */
moegen_status moegen_npy_write(const char *path, moegen_npy_dtype dtype, int ndim,
                               const int64_t *shape, const void *data, moegen_error *err);

/* Read a .npy file into `out` (see the top of this file for what is accepted).
 * On success out->data is malloc'd and never NULL, even for an empty array.
 * On any failure *out is zeroed (data NULL), so moegen_npy_free() is always safe.
 * Preconditions: path and out non-NULL.
 * Returns MOEGEN_OK; MOEGEN_ERR_INVALID_ARGUMENT for a NULL argument;
 * MOEGEN_ERR_IO when the file cannot be opened or read, is not a regular file, or
 * is malformed or unsupported (native_code = errno for system failures, else 0);
 * MOEGEN_ERR_NO_MEMORY when the data cannot be allocated. */
moegen_status moegen_npy_read(const char *path, moegen_npy *out, moegen_error *err);

/* Read only the header of a .npy file: out->dtype, ndim, shape and n_bytes are
 * filled and checked against the file's size exactly as moegen_npy_read does, but no
 * data is read or allocated (out->data stays NULL). Lets a caller decide whether the
 * array fits in memory before reading it. Returns as moegen_npy_read. */
moegen_status moegen_npy_read_header(const char *path, moegen_npy *out, moegen_error *err);

/* Parse a whole .npy file image held in memory (`size` bytes at `bytes`), as
 * moegen_npy_read does; `name` is used in messages only. The data is copied into
 * a fresh malloc'd out->data. Meant for fuzzing and for embedded files.
 * Preconditions: name and out non-NULL; bytes non-NULL unless size is 0.
 * Returns MOEGEN_OK; MOEGEN_ERR_INVALID_ARGUMENT for a NULL argument;
 * MOEGEN_ERR_IO for a malformed or unsupported image; MOEGEN_ERR_NO_MEMORY.
 * On failure *out is zeroed. */
moegen_status moegen_npy_read_buffer(const char *name, const void *bytes, size_t size,
                                     moegen_npy *out, moegen_error *err);

/* Release array->data and zero *array. Safe on NULL and on a zeroed or freed array. */
void moegen_npy_free(moegen_npy *array);

/* Read `path` and check it: its shape must equal `shape` (ndim dims, same
 * rank) and its dtype must be one of `allowed` (n_allowed entries; n_allowed 0
 * accepts any supported dtype). Messages read e.g.
 *   "x.npy: expected shape (16, 64), file has (16, 32)"
 *   "x.npy: dtype '<i4' is not accepted here; expected '<f4' or '<f2'".
 * Preconditions: path and out non-NULL; 0 <= ndim <= MOEGEN_NPY_MAX_DIMS; shape
 * non-NULL when ndim > 0; allowed non-NULL when n_allowed > 0, n_allowed >= 0.
 * Returns MOEGEN_OK; MOEGEN_ERR_INVALID_ARGUMENT for a precondition that fails;
 * MOEGEN_ERR_IO for anything moegen_npy_read rejects and for a shape or dtype
 * mismatch; MOEGEN_ERR_NO_MEMORY. On failure *out is zeroed. */
moegen_status moegen_npy_read_expect(const char *path, int ndim, const int64_t *shape,
                                     const moegen_npy_dtype *allowed, int n_allowed,
                                     moegen_npy *out, moegen_error *err);

/* The NumPy descr of a dtype, e.g. "<f4"; "invalid" for a value outside the
 * enum. Never NULL. */
const char *moegen_npy_dtype_descr(moegen_npy_dtype dtype);

/* Bytes per element of a dtype (2, 4 or 8); 0 for a value outside the enum. */
size_t moegen_npy_dtype_size(moegen_npy_dtype dtype);

/* Format a shape as Python prints a tuple: "()", "(5,)", "(16, 64)", into
 * buffer (truncated to buffer_size, always NUL-terminated when buffer_size > 0).
 * Dims beyond MOEGEN_NPY_MAX_DIMS are not printed. Returns buffer. */
char *moegen_npy_shape_string(int ndim, const int64_t *shape, char *buffer, size_t buffer_size);

#ifdef __cplusplus
}
#endif
#endif
