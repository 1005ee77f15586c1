/* test_npy.c — tests for cli/npy.c: .npy round trips, files written by real NumPy
 * (embedded below, and generated at test time when python3 with numpy is found),
 * shape/dtype checks, every kind of malformed input, and a deterministic mutation
 * loop that must never crash the reader.
 *
 * Environment: MOEGEN_PYTHON names the Python to use for the NumPy fixtures
 * (default python3); those tests are skipped with a message when it has no numpy.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h> /* cmocka needs it first */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "npy.h"

/* ---- files produced by NumPy 2.4 (np.save unless noted) ----------------------- */

/* np.save of np.arange(12, dtype="<f4").reshape(3, 4) */
static const unsigned char numpy_f4_3x4[176] =
    "\223NUMPY\001\000v\000{'descr': '<f4', 'fortran_order': False, 'shape': (3, "
    "4), }                                                          \012\000\000"
    "\000\000\000\000\200\077\000\000\000@\000\000@@\000\000\200@\000\000\240@"
    "\000\000\300@\000\000\340@\000\000\000A\000\000\020A\000\000 A\000\0000A";
/* np.save of np.array(2.5, dtype="<f8") */
static const unsigned char numpy_f8_scalar[136] =
    "\223NUMPY\001\000v\000{'descr': '<f8', 'fortran_order': False, 'shape': (), "
    "}                                                              \012\000\000"
    "\000\000\000\000\004@";
/* np.save of np.arange(5, dtype="<i8") */
static const unsigned char numpy_i8_5[168] =
    "\223NUMPY\001\000v\000{'descr': '<i8', 'fortran_order': False, 'shape': (5,)"
    ", }                                                            \012\000\000"
    "\000\000\000\000\000\000\001\000\000\000\000\000\000\000\002\000\000\000\000"
    "\000\000\000\003\000\000\000\000\000\000\000\004\000\000\000\000\000\000\000";
/* np.save of np.arange(6, dtype="<u2").reshape(1, 2, 3) */
static const unsigned char numpy_u2_1x2x3[140] =
    "\223NUMPY\001\000v\000{'descr': '<u2', 'fortran_order': False, 'shape': (1, "
    "2, 3), }                                                       \012\000\000"
    "\001\000\002\000\003\000\004\000\005\000";
/* np.save of np.zeros((2, 0, 3), dtype="<f4") */
static const unsigned char numpy_f4_2x0x3[128] =
    "\223NUMPY\001\000v\000{'descr': '<f4', 'fortran_order': False, 'shape': (2, "
    "0, 3), }                                                       \012";
/* np.save of np.arange(3, dtype="<f2"), format version 2.0 */
static const unsigned char numpy_f2_3_v2[134] =
    "\223NUMPY\002\000t\000\000\000{'descr': '<f2', 'fortran_order': False, 'shap"
    "e': (3,), }                                                          \012"
    "\000\000\000<\000@";
/* np.save of np.arange(3, dtype="<i4"), format version 3.0 */
static const unsigned char numpy_i4_3_v3[140] =
    "\223NUMPY\003\000t\000\000\000{'descr': '<i4', 'fortran_order': False, 'shap"
    "e': (3,), }                                                          \012"
    "\000\000\000\000\001\000\000\000\002\000\000\000";
/* np.save of np.arange(3, dtype=">f4") */
static const unsigned char numpy_big_endian_f4[140] =
    "\223NUMPY\001\000v\000{'descr': '>f4', 'fortran_order': False, 'shape': (3,)"
    ", }                                                            \012\000\000"
    "\000\000\077\200\000\000@\000\000\000";
/* np.save of np.asfortranarray(np.arange(6, dtype="<f4").reshape(2, 3)) */
static const unsigned char numpy_fortran_f4_2x3[152] =
    "\223NUMPY\001\000v\000{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3"
    "), }                                                           \012\000\000"
    "\000\000\000\000@@\000\000\200\077\000\000\200@\000\000\000@\000\000\240@";
/* np.save of np.arange(3, dtype="u1") */
static const unsigned char numpy_u1_3[131] =
    "\223NUMPY\001\000v\000{'descr': '|u1', 'fortran_order': False, 'shape': (3,)"
    ", }                                                            \012\000\001"
    "\002";
/* np.save of np.zeros(1, dtype=[("a", "<f4"), ("b", "<i4")]) */
static const unsigned char numpy_structured[136] =
    "\223NUMPY\001\000v\000{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order"
    "': False, 'shape': (1,), }                                     \012\000\000"
    "\000\000\000\000\000\000";
/* np.save of np.array([1, "a"], dtype=object) */
static const unsigned char numpy_object[283] =
    "\223NUMPY\001\000v\000{'descr': '|O', 'fortran_order': False, 'shape': (2,),"
    " }                                                             \012\200\004"
    "\225\220\000\000\000\000\000\000\000\214\026numpy._core.multiarray\224\214"
    "\014_reconstruct\224\223\224\214\005numpy\224\214\007ndarray\224\223\224K"
    "\000\205\224C\001b\224\207\224R\224(K\001K\002\205\224h\003\214\005dtype\224"
    "\223\224\214\002O8\224\211\210\207\224R\224(K\003\214\001|\224NNNJ\377\377"
    "\377\377J\377\377\377\377K\077t\224b\211]\224(K\001\214\001a\224et\224b.";
/* np.lib.format.write_array_header_1_0 of an empty '<f4' array of shape
 * (0, 10**12, 10**12, 10**12): long enough that NumPy's spare spaces for the
 * first axis push the header from 128 to 192 bytes. */
static const unsigned char numpy_f4_long_shape[192] =
    "\223NUMPY\001\000\266\000{'descr': '<f4', 'fortran_order': False, 'shape': ("
    "0, 1000000000000, 1000000000000, 1000000000000), }                          "
    "                                                      \012";

/* ---- helpers ------------------------------------------------------------------ */

static char test_dir[512];

static int make_test_dir(void **state) {
    const char *temporary_root = getenv("TMPDIR");
    snprintf(test_dir, sizeof test_dir, "%s/moegen-npy-XXXXXX", temporary_root && *temporary_root ? temporary_root : "/tmp");
    if (!mkdtemp(test_dir)) {
        fprintf(stderr, "cannot create %s: %s\n", test_dir, strerror(errno));
        return -1;
    }
    return 0;
}

static int remove_test_dir(void **state) {
    DIR *dir = opendir(test_dir);
    if (dir) {
        struct dirent *entry;
        char path[1024];
        while ((entry = readdir(dir)) != NULL) {
            if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
            snprintf(path, sizeof path, "%s/%s", test_dir, entry->d_name);
            unlink(path);
        }
        closedir(dir);
    }
    rmdir(test_dir);
    return 0;
}

/* test_dir/name, in a caller's buffer. */
static char *path_in_dir(char *buffer, size_t capacity, const char *name) {
    snprintf(buffer, capacity, "%s/%s", test_dir, name);
    return buffer;
}

static void write_file(const char *path, const void *bytes, size_t size) {
    FILE *file = fopen(path, "wb");
    assert_non_null(file);
    if (size) assert_int_equal(fwrite(bytes, 1, size, file), size);
    assert_int_equal(fclose(file), 0);
}

static unsigned char *read_whole_file(const char *path, size_t *size) {
    FILE *file = fopen(path, "rb");
    assert_non_null(file);
    size_t capacity = 4096, used = 0;
    unsigned char *buffer = malloc(capacity);
    assert_non_null(buffer);
    size_t got;
    while ((got = fread(buffer + used, 1, capacity - used, file)) > 0) {
        used += got;
        if (used == capacity) {
            capacity *= 2;
            buffer = realloc(buffer, capacity);
            assert_non_null(buffer);
        }
    }
    fclose(file);
    *size = used;
    return buffer;
}

/* Count the files in test_dir whose name contains `part`. */
static int files_named_like(const char *part) {
    int matches = 0;
    DIR *dir = opendir(test_dir);
    assert_non_null(dir);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL)
        if (strstr(entry->d_name, part)) matches++;
    closedir(dir);
    return matches;
}

/* A .npy image with header `dict` (padded to 64 bytes with a final '\n'),
 * format `version` (1, 2 or 3), followed by n_data bytes of data. malloc'd. */
static unsigned char *make_image(int version, const char *dict, const void *data, size_t n_data,
                                 size_t *size) {
    size_t prefix = version == 1 ? 10 : 12;
    size_t dict_len = strlen(dict);
    size_t header_len = dict_len + 1;
    header_len += (64 - (prefix + header_len) % 64) % 64;
    *size = prefix + header_len + n_data;
    unsigned char *image = malloc(*size);
    assert_non_null(image);
    memcpy(image, "\x93NUMPY", 6);
    image[6] = (unsigned char)version;
    image[7] = 0;
    for (size_t i = 0; i < prefix - 8; i++)
        image[8 + i] = (unsigned char)(header_len >> (8 * i));
    memcpy(image + prefix, dict, dict_len);
    memset(image + prefix + dict_len, ' ', header_len - dict_len - 1);
    image[prefix + header_len - 1] = '\n';
    if (n_data) memcpy(image + prefix + header_len, data, n_data);
    return image;
}

/* Read `bytes` both from memory and from a file; both must fail with
 * MOEGEN_ERR_IO, a message starting "<name>: " and containing `expected`, and a
 * zeroed output. */
static void assert_rejected(const void *bytes, size_t size, const char *expected) {
    char path[1024];
    path_in_dir(path, sizeof path, "rejected.npy");
    write_file(path, bytes, size);
    moegen_npy array;
    moegen_error err = {0};
    moegen_status status = moegen_npy_read(path, &array, &err);
    if (status != MOEGEN_ERR_IO || !strstr(err.message, expected))
        fail_msg("expected MOEGEN_ERR_IO with \"%s\", got %s: \"%s\"", expected,
                 moegen_status_name(status), err.message);
    assert_int_equal(err.code, MOEGEN_ERR_IO);
    assert_true(strncmp(err.message, path, strlen(path)) == 0);
    assert_string_equal(err.message + strlen(path), strstr(err.message, ": "));
    assert_null(array.data);
    assert_int_equal(array.n_bytes, 0);
    assert_int_equal(array.ndim, 0);

    moegen_error memory_error = {0};
    status = moegen_npy_read_buffer("mem.npy", bytes, size, &array, &memory_error);
    if (status != MOEGEN_ERR_IO || !strstr(memory_error.message, expected))
        fail_msg("from memory: expected MOEGEN_ERR_IO with \"%s\", got %s: \"%s\"", expected,
                 moegen_status_name(status), memory_error.message);
    assert_string_equal(memory_error.message + strlen("mem.npy"), err.message + strlen(path));
    assert_null(array.data);
}

/* As assert_rejected, for an image made from a header dict and data. */
static void assert_dict_rejected(int version, const char *dict, size_t n_data,
                                 const char *expected) {
    unsigned char zeros[256] = {0};
    assert_true(n_data <= sizeof zeros);
    size_t size;
    unsigned char *image = make_image(version, dict, zeros, n_data, &size);
    assert_rejected(image, size, expected);
    free(image);
}

/* Read `bytes` from memory; it must succeed. */
static moegen_npy read_ok(const void *bytes, size_t size) {
    moegen_npy array;
    moegen_error err = {0};
    moegen_status status = moegen_npy_read_buffer("ok.npy", bytes, size, &array, &err);
    if (status != MOEGEN_OK)
        fail_msg("expected success, got %s: %s", moegen_status_name(status), err.message);
    return array;
}

static void assert_shape(const moegen_npy *array, int ndim, ...) {
    assert_int_equal(array->ndim, ndim);
    va_list arguments;
    va_start(arguments, ndim);
    for (int i = 0; i < ndim; i++)
        assert_int_equal(array->shape[i], va_arg(arguments, int));
    va_end(arguments);
    for (int i = ndim; i < MOEGEN_NPY_MAX_DIMS; i++)
        assert_int_equal(array->shape[i], 0);
}

/* IEEE half to double (test-only; handles zero, subnormal and normal values). */
static double half_to_double(uint16_t half) {
    int sign = half >> 15, exponent = (half >> 10) & 0x1F, mantissa = half & 0x3FF;
    double value = exponent == 0 ? ldexp(mantissa, -24) : ldexp(1024 + mantissa, exponent - 25);
    return sign ? -value : value;
}

/* Element i of an array, as a double. */
static double element(const moegen_npy *array, size_t i) {
    const unsigned char *bytes = array->data;
    switch (array->dtype) {
    case MOEGEN_NPY_F4: {
        float value;
        memcpy(&value, bytes + 4 * i, 4);
        return value;
    }
    case MOEGEN_NPY_F8: {
        double value;
        memcpy(&value, bytes + 8 * i, 8);
        return value;
    }
    case MOEGEN_NPY_F2: {
        uint16_t value;
        memcpy(&value, bytes + 2 * i, 2);
        return half_to_double(value);
    }
    case MOEGEN_NPY_U2: {
        uint16_t value;
        memcpy(&value, bytes + 2 * i, 2);
        return value;
    }
    case MOEGEN_NPY_I4: {
        int32_t value;
        memcpy(&value, bytes + 4 * i, 4);
        return value;
    }
    case MOEGEN_NPY_I8: {
        int64_t value;
        memcpy(&value, bytes + 8 * i, 8);
        return (double)value;
    }
    }
    fail_msg("bad dtype %d", (int)array->dtype);
    return 0;
}

/* Element i of the test pattern (i % 2000 is exact in every dtype), stored. */
static void store_pattern(moegen_npy_dtype dtype, void *data, size_t i) {
    unsigned char *bytes = data;
    int64_t value = (int64_t)(i % 2000);
    switch (dtype) {
    case MOEGEN_NPY_F4: {
        float converted = (float)value;
        memcpy(bytes + 4 * i, &converted, 4);
        break;
    }
    case MOEGEN_NPY_F8: {
        double converted = (double)value;
        memcpy(bytes + 8 * i, &converted, 8);
        break;
    }
    case MOEGEN_NPY_F2: {
        /* value < 2048: exact in half. */
        uint16_t half = 0;
        if (value > 0) {
            int exponent = 0;
            while ((value >> exponent) > 1)
                exponent++;
            uint16_t mantissa = (uint16_t)(((value << 10) >> exponent) & 0x3FF);
            half = (uint16_t)(((exponent + 15) << 10) | mantissa);
        }
        memcpy(bytes + 2 * i, &half, 2);
        break;
    }
    case MOEGEN_NPY_U2: {
        uint16_t converted = (uint16_t)value;
        memcpy(bytes + 2 * i, &converted, 2);
        break;
    }
    case MOEGEN_NPY_I4: {
        int32_t converted = (int32_t)value;
        memcpy(bytes + 4 * i, &converted, 4);
        break;
    }
    case MOEGEN_NPY_I8: memcpy(bytes + 8 * i, &value, 8); break;
    }
}

static size_t element_count(int ndim, const int64_t *shape) {
    size_t size = 1;
    for (int i = 0; i < ndim; i++)
        size *= (size_t)shape[i];
    return size;
}

static void assert_pattern(const moegen_npy *array) {
    size_t size = element_count(array->ndim, array->shape);
    assert_int_equal(array->n_bytes, size * moegen_npy_dtype_size(array->dtype));
    for (size_t i = 0; i < size; i++)
        if (element(array, i) != (double)(i % 2000))
            fail_msg("element %zu of a '%s' array is %g, expected %zu", i,
                     moegen_npy_dtype_descr(array->dtype), element(array, i), i % 2000);
}

static const moegen_npy_dtype all_dtypes[] = {MOEGEN_NPY_F4, MOEGEN_NPY_F8, MOEGEN_NPY_F2,
                                              MOEGEN_NPY_U2, MOEGEN_NPY_I4, MOEGEN_NPY_I8};
#define N_DTYPES ((int)(sizeof all_dtypes / sizeof all_dtypes[0]))

/* ---- writing and round trips ---------------------------------------------------- */

static void every_dtype_and_rank_0_to_4_round_trips(void **state) {
    static const int64_t shapes[5][4] = {{0}, {5}, {3, 4}, {2, 3, 4}, {2, 1, 3, 2}};
    char path[1024];
    path_in_dir(path, sizeof path, "round_trip.npy");
    for (int dtype_index = 0; dtype_index < N_DTYPES; dtype_index++) {
        for (int ndim = 0; ndim <= 4; ndim++) {
            moegen_npy_dtype dtype = all_dtypes[dtype_index];
            size_t count = element_count(ndim, shapes[ndim]);
            void *data = malloc(count * moegen_npy_dtype_size(dtype));
            assert_non_null(data);
            for (size_t i = 0; i < count; i++)
                store_pattern(dtype, data, i);
            moegen_error err = {0};
            assert_int_equal(moegen_npy_write(path, dtype, ndim, shapes[ndim], data, &err),
                             MOEGEN_OK);

            size_t file_size;
            unsigned char *file = read_whole_file(path, &file_size);
            size_t header_len = file[8] | (size_t)file[9] << 8;
            assert_int_equal((10 + header_len) % 64, 0);
            assert_int_equal(file[10 + header_len - 1], '\n');
            assert_int_equal(file_size, 10 + header_len + count * moegen_npy_dtype_size(dtype));

            moegen_npy array;
            assert_int_equal(moegen_npy_read(path, &array, &err), MOEGEN_OK);
            assert_int_equal(array.dtype, dtype);
            assert_int_equal(array.ndim, ndim);
            for (int i = 0; i < ndim; i++)
                assert_int_equal(array.shape[i], shapes[ndim][i]);
            assert_int_equal(array.n_bytes, count * moegen_npy_dtype_size(dtype));
            assert_memory_equal(array.data, data, array.n_bytes);
            assert_pattern(&array);
            moegen_npy_free(&array);

            moegen_npy from_memory = read_ok(file, file_size);
            assert_memory_equal(from_memory.data, data, from_memory.n_bytes);
            moegen_npy_free(&from_memory);
            free(file);
            free(data);
        }
    }
    assert_int_equal(files_named_like(".tmp."), 0);
}

static void written_files_are_byte_for_byte_what_numpy_writes(void **state) {
    struct {
        const unsigned char *numpy;
        size_t size;
        moegen_npy_dtype dtype;
        int ndim;
        int64_t shape[4];
    } cases[] = {
        {numpy_f4_3x4, sizeof numpy_f4_3x4, MOEGEN_NPY_F4, 2, {3, 4}},
        {numpy_f8_scalar, sizeof numpy_f8_scalar, MOEGEN_NPY_F8, 0, {0}},
        {numpy_i8_5, sizeof numpy_i8_5, MOEGEN_NPY_I8, 1, {5}},
        {numpy_u2_1x2x3, sizeof numpy_u2_1x2x3, MOEGEN_NPY_U2, 3, {1, 2, 3}},
        {numpy_f4_2x0x3, sizeof numpy_f4_2x0x3, MOEGEN_NPY_F4, 3, {2, 0, 3}},
        {numpy_f4_long_shape,
         sizeof numpy_f4_long_shape,
         MOEGEN_NPY_F4,
         4,
         {0, 1000000000000, 1000000000000, 1000000000000}},
    };
    char path[1024];
    path_in_dir(path, sizeof path, "like_numpy.npy");
    for (size_t case_index = 0; case_index < sizeof cases / sizeof cases[0]; case_index++) {
        moegen_npy array = read_ok(cases[case_index].numpy, cases[case_index].size);
        moegen_error err = {0};
        assert_int_equal(moegen_npy_write(path, cases[case_index].dtype, cases[case_index].ndim,
                                          cases[case_index].shape, array.data, &err),
                         MOEGEN_OK);
        size_t size;
        unsigned char *mine = read_whole_file(path, &size);
        assert_int_equal(size, cases[case_index].size);
        assert_memory_equal(mine, cases[case_index].numpy, size);
        free(mine);
        moegen_npy_free(&array);
    }
}

static void writing_replaces_an_existing_file_and_leaves_no_temporary_file(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "replaced.npy");
    write_file(path, "old contents", 12);
    int64_t shape[1] = {3};
    int32_t data[3] = {7, 8, 9};
    moegen_error err = {0};
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_I4, 1, shape, data, &err), MOEGEN_OK);
    moegen_npy array;
    assert_int_equal(moegen_npy_read(path, &array, &err), MOEGEN_OK);
    assert_memory_equal(array.data, data, sizeof data);
    moegen_npy_free(&array);
    assert_int_equal(files_named_like(".tmp."), 0);
}

static void writing_into_a_missing_directory_fails_with_an_io_error(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "no/such/dir/x.npy");
    float value = 1.0f;
    moegen_error err = {0};
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 0, NULL, &value, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, ENOENT);
    assert_true(strncmp(err.message, path, strlen(path)) == 0);
    assert_non_null(strstr(err.message, "No such file or directory"));
    assert_int_equal(files_named_like(".tmp."), 0);
}

static void writing_over_a_directory_fails_and_removes_the_temporary_file(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "a_directory.npy");
    assert_int_equal(mkdir(path, 0700), 0);
    float value = 1.0f;
    moegen_error err = {0};
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 0, NULL, &value, &err), MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, ": cannot rename "));
    assert_int_not_equal(err.native_code, 0);
    assert_int_equal(files_named_like(".tmp."), 0);
    rmdir(path);
}

static void writing_rejects_invalid_arguments(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "invalid.npy");
    int64_t shape[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    int64_t negative[2] = {2, -1};
    int64_t huge[3] = {INT64_MAX, INT64_MAX, 2};
    float data[1] = {0};
    moegen_error err = {0};
    assert_int_equal(moegen_npy_write(NULL, MOEGEN_NPY_F4, 1, shape, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_write(path, (moegen_npy_dtype)42, 1, shape, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 9, shape, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, -1, shape, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 1, NULL, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 2, negative, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "negative"));
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 3, huge, data, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "overflows"));
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 1, shape, NULL, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(files_named_like("invalid"), 0);
    /* An empty array needs no data. */
    int64_t empty[2] = {4, 0};
    assert_int_equal(moegen_npy_write(path, MOEGEN_NPY_F4, 2, empty, NULL, &err), MOEGEN_OK);
    moegen_npy array;
    assert_int_equal(moegen_npy_read(path, &array, &err), MOEGEN_OK);
    assert_shape(&array, 2, 4, 0);
    assert_int_equal(array.n_bytes, 0);
    assert_non_null(array.data);
    moegen_npy_free(&array);
}

/* ---- reading what NumPy wrote --------------------------------------------------- */

static void files_written_by_numpy_read_back_with_their_values(void **state) {
    moegen_npy array = read_ok(numpy_f4_3x4, sizeof numpy_f4_3x4);
    assert_int_equal(array.dtype, MOEGEN_NPY_F4);
    assert_shape(&array, 2, 3, 4);
    assert_pattern(&array);
    moegen_npy_free(&array);

    array = read_ok(numpy_f8_scalar, sizeof numpy_f8_scalar);
    assert_int_equal(array.dtype, MOEGEN_NPY_F8);
    assert_shape(&array, 0);
    assert_true(element(&array, 0) == 2.5);
    moegen_npy_free(&array);

    array = read_ok(numpy_i8_5, sizeof numpy_i8_5);
    assert_int_equal(array.dtype, MOEGEN_NPY_I8);
    assert_shape(&array, 1, 5);
    assert_pattern(&array);
    moegen_npy_free(&array);

    array = read_ok(numpy_u2_1x2x3, sizeof numpy_u2_1x2x3);
    assert_int_equal(array.dtype, MOEGEN_NPY_U2);
    assert_shape(&array, 3, 1, 2, 3);
    assert_pattern(&array);
    moegen_npy_free(&array);

    array = read_ok(numpy_f4_2x0x3, sizeof numpy_f4_2x0x3);
    assert_shape(&array, 3, 2, 0, 3);
    assert_int_equal(array.n_bytes, 0);
    assert_non_null(array.data);
    moegen_npy_free(&array);
}

static void format_versions_2_and_3_are_read(void **state) {
    moegen_npy array = read_ok(numpy_f2_3_v2, sizeof numpy_f2_3_v2);
    assert_int_equal(array.dtype, MOEGEN_NPY_F2);
    assert_shape(&array, 1, 3);
    assert_pattern(&array);
    moegen_npy_free(&array);

    array = read_ok(numpy_i4_3_v3, sizeof numpy_i4_3_v3);
    assert_int_equal(array.dtype, MOEGEN_NPY_I4);
    assert_shape(&array, 1, 3);
    assert_pattern(&array);
    moegen_npy_free(&array);
}

static void headers_in_any_key_order_whitespace_and_quoting_are_read(void **state) {
    static const char *dicts[] = {
        "{\"shape\":(2,3),\"fortran_order\":False,\"descr\":\"<f4\"}",
        "{ 'fortran_order' : False ,\n  'shape' : ( 2 , 3 , ) ,\t'descr' : '<f4' }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }", /* Python 2 */
        "{'descr': '=f4', 'fortran_order': False, 'shape': (2, 3)}",
        "{'descr':'<f4','fortran_order':False,'shape':(+2,3)}\r\n",
    };
    float data[6] = {0, 1, 2, 3, 4, 5};
    for (size_t i = 0; i < sizeof dicts / sizeof dicts[0]; i++) {
        size_t size;
        unsigned char *image = make_image(1, dicts[i], data, sizeof data, &size);
        moegen_npy array = read_ok(image, size);
        assert_int_equal(array.dtype, MOEGEN_NPY_F4);
        assert_shape(&array, 2, 2, 3);
        assert_pattern(&array);
        moegen_npy_free(&array);
        free(image);
    }
}

static void a_header_aligned_to_16_bytes_like_old_numpy_is_read(void **state) {
    /* NumPy before 1.14 aligned the data to 16 bytes, not 64. */
    static const char old[] = "\x93NUMPY\x01\x00\x46\x00"
                              "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }"
                              "            \n"
                              "\x00\x00\x00\x00\x01\x00\x00\x00";
    assert_int_equal((sizeof old - 1 - 8) % 16, 0);
    moegen_npy array = read_ok(old, sizeof old - 1);
    assert_shape(&array, 1, 2);
    assert_pattern(&array);
    moegen_npy_free(&array);
}

/* ---- read_expect ---------------------------------------------------------------- */

static void write_zeros(const char *path, moegen_npy_dtype dtype, int ndim, const int64_t *shape) {
    size_t size = element_count(ndim, shape) * moegen_npy_dtype_size(dtype);
    void *data = calloc(size ? size : 1, 1);
    moegen_error err = {0};
    assert_int_equal(moegen_npy_write(path, dtype, ndim, shape, data, &err), MOEGEN_OK);
    free(data);
}

static void reading_with_the_expected_shape_and_dtype_succeeds(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "x.npy");
    int64_t shape[2] = {16, 64};
    write_zeros(path, MOEGEN_NPY_F2, 2, shape);
    moegen_npy_dtype allowed[2] = {MOEGEN_NPY_F4, MOEGEN_NPY_F2};
    moegen_npy array;
    moegen_error err = {0};
    assert_int_equal(moegen_npy_read_expect(path, 2, shape, allowed, 2, &array, &err), MOEGEN_OK);
    assert_int_equal(array.dtype, MOEGEN_NPY_F2);
    assert_int_equal(array.n_bytes, 16 * 64 * 2);
    moegen_npy_free(&array);
    /* No allowed list accepts any dtype. */
    assert_int_equal(moegen_npy_read_expect(path, 2, shape, NULL, 0, &array, &err), MOEGEN_OK);
    moegen_npy_free(&array);
}

static void a_shape_mismatch_names_both_shapes(void **state) {
    char path[1024], expected[1200];
    path_in_dir(path, sizeof path, "x.npy");
    int64_t file_shape[2] = {16, 32}, want[2] = {16, 64};
    write_zeros(path, MOEGEN_NPY_F4, 2, file_shape);
    moegen_npy array;
    moegen_error err = {0};
    assert_int_equal(moegen_npy_read_expect(path, 2, want, NULL, 0, &array, &err), MOEGEN_ERR_IO);
    snprintf(expected, sizeof expected, "%s: expected shape (16, 64), file has (16, 32)", path);
    assert_string_equal(err.message, expected);
    assert_null(array.data);

    int64_t vector[1] = {16};
    assert_int_equal(moegen_npy_read_expect(path, 1, vector, NULL, 0, &array, &err), MOEGEN_ERR_IO);
    snprintf(expected, sizeof expected, "%s: expected shape (16,), file has (16, 32)", path);
    assert_string_equal(err.message, expected);

    assert_int_equal(moegen_npy_read_expect(path, 0, NULL, NULL, 0, &array, &err), MOEGEN_ERR_IO);
    snprintf(expected, sizeof expected, "%s: expected shape (), file has (16, 32)", path);
    assert_string_equal(err.message, expected);
}

static void a_dtype_mismatch_names_the_dtypes_accepted(void **state) {
    char path[1024], expected[1200];
    path_in_dir(path, sizeof path, "x.npy");
    int64_t shape[1] = {8};
    write_zeros(path, MOEGEN_NPY_I4, 1, shape);
    moegen_npy array;
    moegen_error err = {0};
    moegen_npy_dtype two[2] = {MOEGEN_NPY_F4, MOEGEN_NPY_F2};
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, two, 2, &array, &err), MOEGEN_ERR_IO);
    snprintf(expected, sizeof expected,
             "%s: dtype '<i4' is not accepted here; expected '<f4' or '<f2'", path);
    assert_string_equal(err.message, expected);
    assert_null(array.data);

    moegen_npy_dtype three[3] = {MOEGEN_NPY_F4, MOEGEN_NPY_F2, MOEGEN_NPY_U2};
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, three, 3, &array, &err), MOEGEN_ERR_IO);
    snprintf(expected, sizeof expected,
             "%s: dtype '<i4' is not accepted here; expected '<f4', '<f2' or '<u2'", path);
    assert_string_equal(err.message, expected);

    moegen_npy_dtype one[1] = {MOEGEN_NPY_I8};
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, one, 1, &array, &err), MOEGEN_ERR_IO);
    snprintf(expected, sizeof expected, "%s: dtype '<i4' is not accepted here; expected '<i8'",
             path);
    assert_string_equal(err.message, expected);
}

static void read_expect_passes_on_read_errors_and_rejects_bad_arguments(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "missing.npy");
    int64_t shape[1] = {8};
    moegen_npy array;
    moegen_error err = {0};
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, NULL, 0, &array, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, ENOENT);
    assert_non_null(strstr(err.message, "cannot open: No such file or directory"));
    assert_int_equal(moegen_npy_read_expect(path, 1, NULL, NULL, 0, &array, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_read_expect(path, 9, shape, NULL, 0, &array, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, NULL, 1, &array, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    moegen_npy_dtype bad[1] = {(moegen_npy_dtype)17};
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, bad, 1, &array, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_read_expect(path, 1, shape, NULL, 0, NULL, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
}

/* ---- malformed and unsupported input -------------------------------------------- */

static void a_big_endian_file_is_rejected_with_advice_to_save_little_endian(void **state) {
    assert_rejected(numpy_big_endian_f4, sizeof numpy_big_endian_f4,
                    ": dtype '>f4' is big-endian; save with '<f4'");
    assert_dict_rejected(1, "{'descr': '>i8', 'fortran_order': False, 'shape': (1,), }", 8,
                         ": dtype '>i8' is big-endian; save with '<i8'");
}

static void fortran_order_is_rejected(void **state) {
    assert_rejected(numpy_fortran_f4_2x3, sizeof numpy_fortran_f4_2x3,
                    ": fortran_order is True (column-major data) and is not supported");
}

static void unsupported_dtypes_are_rejected_naming_the_dtype(void **state) {
    assert_rejected(numpy_u1_3, sizeof numpy_u1_3, ": dtype '|u1' is not supported");
    assert_rejected(numpy_object, sizeof numpy_object, ": dtype '|O' is an object array");
    assert_rejected(numpy_structured, sizeof numpy_structured, ": structured dtypes");
    assert_dict_rejected(1, "{'descr': '|f4', 'fortran_order': False, 'shape': (1,), }", 4,
                         ": dtype '|f4': byte order '|' (not applicable) is not valid for a "
                         "4-byte type");
    assert_dict_rejected(1, "{'descr': '<V2', 'fortran_order': False, 'shape': (1,), }", 2,
                         "(raw bytes) is not supported; for bfloat16");
    assert_dict_rejected(1, "{'descr': '<U3', 'fortran_order': False, 'shape': (1,), }", 12,
                         ": dtype '<U3' is not supported; use one of");
    assert_dict_rejected(1, "{'descr': '<f16', 'fortran_order': False, 'shape': (1,), }", 16,
                         ": dtype '<f16' is not supported");
    assert_dict_rejected(1, "{'descr': '', 'fortran_order': False, 'shape': (1,), }", 4,
                         ": dtype '' is not supported");
}

static void bad_magic_version_and_short_files_are_rejected(void **state) {
    assert_rejected("", 0, ": file is empty");
    assert_rejected("\x93NUM", 4, ": file is truncated: 4 bytes");
    assert_rejected("\x93NUMPY\x01", 7, ": file is truncated: 7 bytes");
    assert_rejected("\x93NUMPY\x01\x00\x10", 9, ": file is truncated: 9 bytes");
    assert_rejected("\x93NUMPY\x02\x00\x10\x00\x00", 11, ": file is truncated: 11 bytes");
    assert_rejected("PK\x03\x04 this is a zip", 19, ": not a .npy file");
    assert_rejected("\x93NUMPZ\x01\x00\x10\x00", 10, ": not a .npy file");
    unsigned char image[sizeof numpy_i8_5];
    memcpy(image, numpy_i8_5, sizeof image);
    image[6] = 4;
    assert_rejected(image, sizeof image, ": unsupported .npy format version 4.0");
    image[6] = 1;
    image[7] = 1;
    assert_rejected(image, sizeof image, ": unsupported .npy format version 1.1");
    image[6] = 0;
    image[7] = 0;
    assert_rejected(image, sizeof image, ": unsupported .npy format version 0.0");
}

static void a_header_length_beyond_the_file_is_rejected(void **state) {
    unsigned char image[sizeof numpy_i8_5];
    memcpy(image, numpy_i8_5, sizeof image);
    image[8] = 0xFF;
    image[9] = 0xFF;
    assert_rejected(image, sizeof image,
                    ": header length 65535 runs past the end of the file (168 bytes)");
    assert_rejected(image, 100, ": header length 65535 runs past the end of the file (100 bytes)");
    unsigned char version_2[sizeof numpy_f2_3_v2];
    memcpy(version_2, numpy_f2_3_v2, sizeof version_2);
    version_2[11] = 0x80;
    assert_rejected(version_2, sizeof version_2,
                    ": header length 2147483764 runs past the end of the file");
    memcpy(version_2, numpy_f2_3_v2, sizeof version_2);
    version_2[8] = version_2[9] = version_2[10] = version_2[11] = 0xFF;
    assert_rejected(version_2, sizeof version_2, ": header length 4294967295 runs past");
    memcpy(image, numpy_i8_5, sizeof image);
    image[8] = 0;
    image[9] = 0;
    assert_rejected(image, sizeof image, ": header is empty");
}

static void truncated_data_and_trailing_bytes_are_rejected(void **state) {
    assert_rejected(numpy_f4_3x4, sizeof numpy_f4_3x4 - 1,
                    ": data is truncated: shape (3, 4) of '<f4' needs 48 bytes, the file has 47");
    assert_rejected(numpy_f4_3x4, 128,
                    ": data is truncated: shape (3, 4) of '<f4' needs 48 bytes, the file has 0");
    unsigned char image[sizeof numpy_f4_3x4 + 5];
    memcpy(image, numpy_f4_3x4, sizeof numpy_f4_3x4);
    memset(image + sizeof numpy_f4_3x4, 0, 5);
    assert_rejected(image, sizeof image,
                    ": 5 unexpected bytes after the data (shape (3, 4) of '<f4' needs 48 bytes)");
    /* Two arrays appended to one file must not load as the first. */
    unsigned char two[2 * sizeof numpy_i8_5];
    memcpy(two, numpy_i8_5, sizeof numpy_i8_5);
    memcpy(two + sizeof numpy_i8_5, numpy_i8_5, sizeof numpy_i8_5);
    assert_rejected(two, sizeof two, ": 168 unexpected bytes after the data");
}

static void negative_huge_and_too_many_dimensions_are_rejected(void **state) {
    assert_dict_rejected(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", 0,
                         ": shape has a negative dimension (-1)");
    assert_dict_rejected(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", 0,
                         ": shape has a negative dimension (-3)");
    assert_dict_rejected(
        1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", 0,
        ": shape dimension 0 is too large");
    assert_dict_rejected(
        1, "{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775808,), }", 0,
        ": shape dimension 0 is too large");
    /* Each dim fits an int64, the product does not. */
    assert_dict_rejected(
        1, "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", 0,
        ": array of shape (4294967296, 4294967296) and dtype '<f8' is too large");
    assert_dict_rejected(
        1, "{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775807,), }", 0,
        "is too large (its size overflows)");
    /* Big but representable: must be caught as truncated, not allocated. */
    assert_dict_rejected(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }",
                         0, ": data is truncated");
    assert_dict_rejected(
        1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1, 1, 1, 1, 1), }", 4,
        ": shape has more than 8 dimensions");
    /* A zero dim makes the array empty whatever the others are. */
    size_t size;
    unsigned char *image = make_image(
        1, "{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775807, 0), }", NULL, 0,
        &size);
    moegen_npy array = read_ok(image, size);
    assert_int_equal(array.n_bytes, 0);
    assert_int_equal(array.shape[0], INT64_MAX);
    moegen_npy_free(&array);
    free(image);
}

static void malformed_header_dicts_are_rejected_saying_what_is_wrong(void **state) {
    static const struct {
        const char *dict;
        const char *message;
    } cases[] = {
        {"", ": malformed .npy header: expected '{' starting the header dict, found the end"},
        {"descr: '<f4'", "expected '{' starting the header dict, found 'd'"},
        {"{'descr': '<f4', 'fortran_order': False}", ": the .npy header has no 'shape' key"},
        {"{'shape': (1,), 'fortran_order': False}", ": the .npy header has no 'descr' key"},
        {"{'shape': (1,), 'descr': '<f4'}", ": the .npy header has no 'fortran_order' key"},
        {"{}", ": the .npy header has no 'descr' key"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}",
         ": unexpected key 'extra' in the .npy header"},
        {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
         ": key 'descr' appears twice"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} junk",
         "expected only padding after the header dict, found 'j'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,)",
         "expected ',' or '}' after a value, found the end of the header"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,),,}",
         "expected a quoted key or '}', found ','"},
        {"{'descr': '<f4 , 'fortran_order': False, 'shape': (1,)}", "expected ',' or '}'"},
        {"{'descr': '<f4", "unterminated string"},
        {"{'descr': '<f\\x34', 'fortran_order': False, 'shape': (1,)}", "escapes in strings"},
        {"{'descr' '<f4', 'fortran_order': False, 'shape': (1,)}", "expected ':' after a key"},
        {"{descr: '<f4', 'fortran_order': False, 'shape': (1,)}", "expected a quoted key or '}'"},
        {"{'descr': <f4, 'fortran_order': False, 'shape': (1,)}", "expected a quoted string"},
        {"{'descr': '<f4', 'fortran_order': false, 'shape': (1,)}",
         "fortran_order must be True or False"},
        {"{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
         "fortran_order must be True or False"},
        {"{'descr': '<f4', 'fortran_order': Falsey, 'shape': (1,)}",
         "fortran_order must be True or False"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1)}",
         ": shape (1) is not a tuple; a 1-d shape is written (1,)"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': [1]}", "shape must be a tuple"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': 1}", "expected '(' starting the shape"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (,)}",
         "expected an integer, found ','"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1 2)}",
         "expected ',' or ')' in the shape tuple, found '2'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,)}", "expected a decimal integer"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (0x10,)}",
         "expected a decimal integer"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1_0,)}", "expected a decimal integer"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,",
         "expected an integer, found the end"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2",
         "expected ',' or ')' in the shape"},
        {"{'descr': '\xc3\xa9', 'fortran_order': False, 'shape': (1,)}",
         "expected printable ASCII in a string, found byte 0xc3"},
        {"{'descr': "
         "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'"
         ", "
         "'fortran_order': False, 'shape': (1,)}",
         "string too long"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_dict_rejected(1, cases[i].dict, 4, cases[i].message);
    /* The byte offset in the message counts from the start of the file. */
    assert_dict_rejected(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1 2)}", 4,
                         "header at byte 63: expected ',' or ')'");
    assert_dict_rejected(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (1 2)}", 4,
                         "header at byte 65: expected ',' or ')'");
}

static void a_nul_byte_in_the_header_is_rejected(void **state) {
    unsigned char image[sizeof numpy_i8_5];
    memcpy(image, numpy_i8_5, sizeof image);
    image[70] = 0;
    assert_rejected(image, sizeof image,
                    "expected only padding after the header dict, found byte 0x00");
    memcpy(image, numpy_i8_5, sizeof image);
    image[13] = 0; /* inside 'descr' */
    assert_rejected(image, sizeof image, "expected printable ASCII in a string, found byte 0x00");
}

static void reading_a_missing_file_or_a_directory_fails_with_an_io_error(void **state) {
    char path[1024];
    path_in_dir(path, sizeof path, "does-not-exist.npy");
    moegen_npy array;
    moegen_error err = {0};
    assert_int_equal(moegen_npy_read(path, &array, &err), MOEGEN_ERR_IO);
    assert_int_equal(err.native_code, ENOENT);
    assert_null(array.data);
    assert_int_equal(moegen_npy_read(test_dir, &array, &err), MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, ": not a regular file"));
    /* A FIFO with no writer must be rejected, not block. */
    char fifo[1024];
    path_in_dir(fifo, sizeof fifo, "fifo.npy");
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_int_equal(moegen_npy_read(fifo, &array, &err), MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, ": not a regular file"));
    unlink(fifo);
    assert_int_equal(moegen_npy_read(NULL, &array, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_read(path, NULL, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_int_equal(moegen_npy_read_buffer("x", NULL, 4, &array, &err),
                     MOEGEN_ERR_INVALID_ARGUMENT);
    moegen_npy_free(NULL);
    moegen_npy_free(&array);
}

/* ---- mutation loop -------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t next_random(void) {
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

/* A read that succeeded must describe itself consistently. */
static void assert_consistent(const moegen_npy *array) {
    assert_true(array->ndim >= 0 && array->ndim <= MOEGEN_NPY_MAX_DIMS);
    assert_true(moegen_npy_dtype_size(array->dtype) > 0);
    assert_non_null(array->data);
    uint64_t size = moegen_npy_dtype_size(array->dtype);
    bool empty = false;
    for (int i = 0; i < array->ndim; i++) {
        assert_true(array->shape[i] >= 0);
        if (array->shape[i] == 0) empty = true;
    }
    for (int i = 0; !empty && i < array->ndim; i++)
        size *= (uint64_t)array->shape[i];
    assert_int_equal(array->n_bytes, empty ? 0 : size);
}

static void mutated_files_never_crash_the_reader(void **state) {
    static const struct {
        const unsigned char *bytes;
        size_t size;
    } seeds[] = {
        {numpy_f4_3x4, sizeof numpy_f4_3x4},     {numpy_f8_scalar, sizeof numpy_f8_scalar},
        {numpy_i8_5, sizeof numpy_i8_5},         {numpy_u2_1x2x3, sizeof numpy_u2_1x2x3},
        {numpy_f2_3_v2, sizeof numpy_f2_3_v2},   {numpy_i4_3_v3, sizeof numpy_i4_3_v3},
        {numpy_f4_2x0x3, sizeof numpy_f4_2x0x3},
    };
    static const char tokens[] = "(),:'\" 0123456789-+L{}[]<>|=TrueFalsefi\n\t";
    const int seed_count = (int)(sizeof seeds / sizeof seeds[0]);
    char path[1024];
    path_in_dir(path, sizeof path, "mutant.npy");
    rng_state = 0x6d6f6567656e6e70ULL;
    int accepted = 0, rejected = 0;
    for (int iteration = 0; iteration < 2000; iteration++) {
        int seed = iteration % seed_count;
        size_t size = seeds[seed].size;
        unsigned char buf[512];
        memcpy(buf, seeds[seed].bytes, size);
        int n_mutations = 1 + (int)(next_random() % 3);
        for (int mutation = 0; mutation < n_mutations; mutation++) {
            uint64_t random = next_random();
            size_t header_end = size < 140 ? size : 140;
            switch (random % 6) {
            case 0: /* any byte to any value */
                if (size) buf[(random >> 8) % size] = (unsigned char)(random >> 32);
                break;
            case 1: /* a header byte to a token that matters to the parser */
                if (header_end)
                    buf[(random >> 8) % header_end] =
                        (unsigned char)tokens[(random >> 32) % (sizeof tokens - 1)];
                break;
            case 2: /* flip one bit of the prefix */
                buf[(random >> 8) % 12] ^= (unsigned char)(1u << ((random >> 32) % 8));
                break;
            case 3: /* truncate */ size = (size_t)((random >> 8) % (size + 1)); break;
            case 4: /* append */
            {
                size_t extra = (size_t)((random >> 8) % 16);
                if (size + extra > sizeof buf) extra = sizeof buf - size;
                for (size_t i = 0; i < extra; i++)
                    buf[size + i] = (unsigned char)(next_random() >> 40);
                size += extra;
                break;
            }
            case 5: /* delete one header byte */
                if (header_end > 10) {
                    size_t at = 10 + (size_t)((random >> 8) % (header_end - 10));
                    memmove(buf + at, buf + at + 1, size - at - 1);
                    size--;
                }
                break;
            }
        }
        moegen_npy array;
        moegen_error err = {0};
        moegen_status status = moegen_npy_read_buffer("mutant.npy", buf, size, &array, &err);
        assert_true(status == MOEGEN_OK || status == MOEGEN_ERR_IO);
        if (status == MOEGEN_OK) {
            assert_consistent(&array);
            accepted++;
        } else {
            assert_null(array.data);
            assert_true(strncmp(err.message, "mutant.npy: ", 12) == 0);
            rejected++;
        }
        if (iteration % 10 == 0) { /* the file path must agree with the memory path */
            write_file(path, buf, size);
            moegen_npy from_file;
            moegen_error file_error = {0};
            moegen_status status_from_file = moegen_npy_read(path, &from_file, &file_error);
            assert_int_equal(status_from_file, status);
            if (status == MOEGEN_OK) {
                assert_int_equal(from_file.n_bytes, array.n_bytes);
                assert_memory_equal(from_file.data, array.data, array.n_bytes ? array.n_bytes : 1);
            } else {
                assert_string_equal(file_error.message + strlen(path),
                                    err.message + strlen("mutant.npy"));
            }
            moegen_npy_free(&from_file);
        }
        moegen_npy_free(&array);
    }
    print_message("mutation loop: %d accepted, %d rejected\n", accepted, rejected);
    /* Both outcomes must have happened, or the mutations are too weak or too strong. */
    assert_true(accepted > 20);
    assert_true(rejected > 500);
}

/* ---- small helpers -------------------------------------------------------------- */

static void dtype_names_and_sizes_match_numpy(void **state) {
    static const char *descrs[] = {"<f4", "<f8", "<f2", "<u2", "<i4", "<i8"};
    static const size_t sizes[] = {4, 8, 2, 2, 4, 8};
    for (int i = 0; i < N_DTYPES; i++) {
        assert_string_equal(moegen_npy_dtype_descr(all_dtypes[i]), descrs[i]);
        assert_int_equal(moegen_npy_dtype_size(all_dtypes[i]), sizes[i]);
    }
    assert_string_equal(moegen_npy_dtype_descr((moegen_npy_dtype)99), "invalid");
    assert_string_equal(moegen_npy_dtype_descr((moegen_npy_dtype)-1), "invalid");
    assert_int_equal(moegen_npy_dtype_size((moegen_npy_dtype)99), 0);
}

static void shapes_print_as_python_tuples(void **state) {
    char buf[64];
    int64_t shape[3] = {16, 64, 3};
    assert_string_equal(moegen_npy_shape_string(0, shape, buf, sizeof buf), "()");
    assert_string_equal(moegen_npy_shape_string(1, shape, buf, sizeof buf), "(16,)");
    assert_string_equal(moegen_npy_shape_string(3, shape, buf, sizeof buf), "(16, 64, 3)");
    char tiny[5];
    assert_string_equal(moegen_npy_shape_string(3, shape, tiny, sizeof tiny), "(16,");
}

/* ---- files made by the real NumPy at test time ---------------------------------- */

static const char fixture_script[] =
    "import io, os, sys\n"
    "import numpy as np\n"
    "mode, d = sys.argv[1], sys.argv[2]\n"
    "codes = ['<f4', '<f8', '<f2', '<u2', '<i4', '<i8']\n"
    "shapes = [(), (7,), (3, 4), (2, 3, 4), (2, 1, 3, 2), (0, 5), (12345,), (10, 100)]\n"
    "def expected(code, shape):\n"
    "    n = int(np.prod(shape, dtype=np.int64))\n"
    "    return (np.arange(n) % 2000).astype(code).reshape(shape)\n"
    "for ci, code in enumerate(codes):\n"
    "    for si, shape in enumerate(shapes):\n"
    "        a = expected(code, shape)\n"
    "        if mode == 'gen':\n"
    "            np.save(os.path.join(d, 'np_%d_%d.npy' % (ci, si)), a)\n"
    "            continue\n"
    "        p = os.path.join(d, 'c_%d_%d.npy' % (ci, si))\n"
    "        b = np.load(p)\n"
    "        assert b.dtype == a.dtype and b.shape == a.shape, p\n"
    "        assert np.array_equal(a, b), p\n"
    "        buf = io.BytesIO()\n"
    "        np.save(buf, a)\n"
    "        with open(p, 'rb') as f:\n"
    "            assert f.read() == buf.getvalue(), p + ' differs from what np.save writes'\n"
    "headers = [(0,) + (10 ** j,) * k for j in range(19) for k in range(1, 4)]\n"
    "headers += [(10 ** j, 0) for j in range(19)]\n"
    "for hi, shape in enumerate(headers):\n"
    "    p = os.path.join(d, ('np_h_%d.npy' if mode == 'gen' else 'c_h_%d.npy') % hi)\n"
    "    buf = io.BytesIO()\n"
    "    np.lib.format.write_array_header_1_0(\n"
    "        buf, {'descr': '<f4', 'fortran_order': False, 'shape': shape})\n"
    "    if mode == 'gen':\n"
    "        with open(p, 'wb') as f:\n"
    "            f.write(buf.getvalue())\n"
    "    else:\n"
    "        with open(p, 'rb') as f:\n"
    "            assert f.read() == buf.getvalue(), p + ' header differs from NumPy'\n"
    "if mode == 'gen':\n"
    "    for v in (2, 3):\n"
    "        with open(os.path.join(d, 'np_v%d.npy' % v), 'wb') as f:\n"
    "            np.lib.format.write_array(f, expected('<f4', (3, 4)), version=(v, 0))\n"
    "    np.save(os.path.join(d, 'np_big.npy'), np.arange(3, dtype='>f8'))\n"
    "    np.save(os.path.join(d, 'np_fortran.npy'), np.asfortranarray(expected('<f4', (3, 4))))\n"
    "    np.save(os.path.join(d, 'np_bool.npy'), np.ones(3, dtype=bool))\n";

static const int64_t fixture_shapes[][4] = {{0},          {7},    {3, 4},  {2, 3, 4},
                                            {2, 1, 3, 2}, {0, 5}, {12345}, {10, 100}};
static const int fixture_ndims[] = {0, 1, 2, 3, 4, 2, 1, 2};
#define N_FIXTURE_SHAPES ((int)(sizeof fixture_ndims / sizeof fixture_ndims[0]))

/* Empty '<f4' arrays whose headers sweep the lengths where NumPy's spare
 * spaces for the first axis change the header size; the script's `headers`. */
#define N_HEADER_SHAPES (19 * 3 + 19)

static int header_shape(int index, int64_t shape[4]) {
    int64_t power = 1;
    if (index < 19 * 3) {
        for (int j = 0; j < index / 3; j++)
            power *= 10;
        int rank = index % 3 + 1;
        shape[0] = 0;
        for (int i = 1; i <= rank; i++)
            shape[i] = power;
        return rank + 1;
    }
    for (int j = 0; j < index - 19 * 3; j++)
        power *= 10;
    shape[0] = power;
    shape[1] = 0;
    return 2;
}

/* Run the fixture script in `mode`; returns its exit status. */
static int run_fixture_script(const char *python, const char *mode) {
    char script[1024], command[4096];
    path_in_dir(script, sizeof script, "fixtures.py");
    write_file(script, fixture_script, sizeof fixture_script - 1);
    snprintf(command, sizeof command, "'%s' '%s' %s '%s'", python, script, mode, test_dir);
    return system(command);
}

/* The Python to use, or NULL (and a message) when it has no numpy. */
static const char *python_with_numpy(void) {
    const char *python = getenv("MOEGEN_PYTHON");
    if (!python || !*python) python = "python3";
    if (strchr(python, '\'')) return NULL;
    char command[1024];
    snprintf(command, sizeof command, "'%s' -c 'import numpy' >/dev/null 2>&1", python);
    if (system(command) != 0) {
        fprintf(stderr,
                "[  SKIP    ] %s has no numpy; the tests against files NumPy makes at test "
                "time are skipped (the embedded NumPy files still run; set "
                "MOEGEN_PYTHON to a Python with numpy)\n",
                python);
        return NULL;
    }
    return python;
}

static void files_numpy_writes_now_read_back_with_their_values(void **state) {
    const char *python = python_with_numpy();
    if (!python) skip();
    assert_int_equal(run_fixture_script(python, "gen"), 0);
    char name[64], path[1024];
    moegen_error err = {0};
    for (int dtype_index = 0; dtype_index < N_DTYPES; dtype_index++) {
        for (int shape_index = 0; shape_index < N_FIXTURE_SHAPES; shape_index++) {
            snprintf(name, sizeof name, "np_%d_%d.npy", dtype_index, shape_index);
            moegen_npy array;
            path_in_dir(path, sizeof path, name);
            assert_int_equal(moegen_npy_read_expect(path, fixture_ndims[shape_index],
                                                    fixture_shapes[shape_index],
                                                    &all_dtypes[dtype_index], 1, &array, &err),
                             MOEGEN_OK);
            assert_pattern(&array);
            moegen_npy_free(&array);
        }
    }
    for (int version = 2; version <= 3; version++) {
        snprintf(name, sizeof name, "np_v%d.npy", version);
        moegen_npy array;
        assert_int_equal(moegen_npy_read(path_in_dir(path, sizeof path, name), &array, &err),
                         MOEGEN_OK);
        assert_shape(&array, 2, 3, 4);
        assert_pattern(&array);
        moegen_npy_free(&array);
    }
    moegen_npy_dtype f4 = MOEGEN_NPY_F4;
    for (int header_index = 0; header_index < N_HEADER_SHAPES; header_index++) {
        int64_t shape[4];
        int ndim = header_shape(header_index, shape);
        snprintf(name, sizeof name, "np_h_%d.npy", header_index);
        moegen_npy array;
        assert_int_equal(moegen_npy_read_expect(path_in_dir(path, sizeof path, name), ndim, shape,
                                                &f4, 1, &array, &err),
                         MOEGEN_OK);
        assert_int_equal(array.n_bytes, 0);
        moegen_npy_free(&array);
    }
    moegen_npy array;
    assert_int_equal(moegen_npy_read(path_in_dir(path, sizeof path, "np_big.npy"), &array, &err),
                     MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, ": dtype '>f8' is big-endian; save with '<f8'"));
    assert_int_equal(
        moegen_npy_read(path_in_dir(path, sizeof path, "np_fortran.npy"), &array, &err),
        MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, ": fortran_order is True"));
    assert_int_equal(moegen_npy_read(path_in_dir(path, sizeof path, "np_bool.npy"), &array, &err),
                     MOEGEN_ERR_IO);
    assert_non_null(strstr(err.message, ": dtype '|b1' is not supported"));
}

static void numpy_loads_what_we_write_and_would_write_the_same_bytes(void **state) {
    const char *python = python_with_numpy();
    if (!python) skip();
    char name[64], path[1024];
    for (int dtype_index = 0; dtype_index < N_DTYPES; dtype_index++) {
        for (int shape_index = 0; shape_index < N_FIXTURE_SHAPES; shape_index++) {
            size_t count = element_count(fixture_ndims[shape_index], fixture_shapes[shape_index]);
            void *data = malloc(count * moegen_npy_dtype_size(all_dtypes[dtype_index]) + 1);
            assert_non_null(data);
            for (size_t i = 0; i < count; i++)
                store_pattern(all_dtypes[dtype_index], data, i);
            snprintf(name, sizeof name, "c_%d_%d.npy", dtype_index, shape_index);
            moegen_error err = {0};
            assert_int_equal(moegen_npy_write(path_in_dir(path, sizeof path, name),
                                              all_dtypes[dtype_index], fixture_ndims[shape_index],
                                              fixture_shapes[shape_index], data, &err),
                             MOEGEN_OK);
            free(data);
        }
    }
    for (int header_index = 0; header_index < N_HEADER_SHAPES; header_index++) {
        int64_t shape[4];
        int ndim = header_shape(header_index, shape);
        snprintf(name, sizeof name, "c_h_%d.npy", header_index);
        moegen_error err = {0};
        assert_int_equal(moegen_npy_write(path_in_dir(path, sizeof path, name), MOEGEN_NPY_F4, ndim,
                                          shape, NULL, &err),
                         MOEGEN_OK);
    }
    assert_int_equal(run_fixture_script(python, "check"), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_dtype_and_rank_0_to_4_round_trips),
        cmocka_unit_test(written_files_are_byte_for_byte_what_numpy_writes),
        cmocka_unit_test(writing_replaces_an_existing_file_and_leaves_no_temporary_file),
        cmocka_unit_test(writing_into_a_missing_directory_fails_with_an_io_error),
        cmocka_unit_test(writing_over_a_directory_fails_and_removes_the_temporary_file),
        cmocka_unit_test(writing_rejects_invalid_arguments),
        cmocka_unit_test(files_written_by_numpy_read_back_with_their_values),
        cmocka_unit_test(format_versions_2_and_3_are_read),
        cmocka_unit_test(headers_in_any_key_order_whitespace_and_quoting_are_read),
        cmocka_unit_test(a_header_aligned_to_16_bytes_like_old_numpy_is_read),
        cmocka_unit_test(reading_with_the_expected_shape_and_dtype_succeeds),
        cmocka_unit_test(a_shape_mismatch_names_both_shapes),
        cmocka_unit_test(a_dtype_mismatch_names_the_dtypes_accepted),
        cmocka_unit_test(read_expect_passes_on_read_errors_and_rejects_bad_arguments),
        cmocka_unit_test(a_big_endian_file_is_rejected_with_advice_to_save_little_endian),
        cmocka_unit_test(fortran_order_is_rejected),
        cmocka_unit_test(unsupported_dtypes_are_rejected_naming_the_dtype),
        cmocka_unit_test(bad_magic_version_and_short_files_are_rejected),
        cmocka_unit_test(a_header_length_beyond_the_file_is_rejected),
        cmocka_unit_test(truncated_data_and_trailing_bytes_are_rejected),
        cmocka_unit_test(negative_huge_and_too_many_dimensions_are_rejected),
        cmocka_unit_test(malformed_header_dicts_are_rejected_saying_what_is_wrong),
        cmocka_unit_test(a_nul_byte_in_the_header_is_rejected),
        cmocka_unit_test(reading_a_missing_file_or_a_directory_fails_with_an_io_error),
        cmocka_unit_test(mutated_files_never_crash_the_reader),
        cmocka_unit_test(dtype_names_and_sizes_match_numpy),
        cmocka_unit_test(shapes_print_as_python_tuples),
        cmocka_unit_test(files_numpy_writes_now_read_back_with_their_values),
        cmocka_unit_test(numpy_loads_what_we_write_and_would_write_the_same_bytes),
    };
    return cmocka_run_group_tests(tests, make_test_dir, remove_test_dir);
}
