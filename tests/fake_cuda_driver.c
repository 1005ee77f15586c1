/* fake_cuda_driver.c — a CUDA driver without a GPU, for tests/test_cuda_backend.c.
 *
 * Place in the pipeline: stands in for libcuda.so.1 ($MOEGEN_CUDA_DRIVER_LIB) under
 * runtime/cuda_api.c, so that runtime/cuda_backend.c can open a layer (real NVRTC
 * compile, real cache, module "load") and run its forward's launch sequence on a
 * machine without a GPU. Nothing is computed: every launch is recorded (kernel name,
 * grid, block, dynamic shared memory, the GEMM launches' group arguments) for the test
 * to check against templates/common/moegen_cuda_abi.h.
 *
 * What it does:
 *  - one device whose compute capability is $FAKE_CUDA_CC ("10.0"; default "9.0");
 *  - cuModuleLoadData copies the CUBIN (an ELF image; anything else is
 *    CUDA_ERROR_INVALID_IMAGE) and cuModuleGetFunction finds kernels in its symbol table,
 *    as the real driver does: a name the module lacks is CUDA_ERROR_NOT_FOUND. A kernel
 *    whose name ends with $FAKE_CUDA_HIDE (when set) is reported missing too;
 *  - each kernel's __launch_bounds__ is read from the CUBIN (the EIATTR_MAX_THREADS entry
 *    of its .nv.info.<name> section) and recorded with each launch; like the real
 *    driver, a launch with more threads per block than that is CUDA_ERROR_INVALID_VALUE;
 *  - device memory is fake addresses (never dereferenced by the host code under test);
 *    device-to-host copies write zeros;
 *  - every other driver symbol moegen_cuda_open needs exists and fails with
 *    CUDA_ERROR_UNKNOWN.
 * The recorded launches are read through fake_cuda_launch_count / fake_cuda_launch and
 * cleared by fake_cuda_reset (looked up with dlsym by the test). State is per process
 * and not thread-safe: the test is single-threaded.
 */
#include <elf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_INVALID_IMAGE 200
#define CUDA_ERROR_NOT_FOUND 500
#define CUDA_ERROR_UNKNOWN 999
#define EM_CUDA_MACHINE 190

#define FAKE_NAME_BYTES 256
#define FAKE_MAX_LAUNCHES 64

/* One cuLaunchKernel call. */
typedef struct fake_cuda_launch_record {
    char name[FAKE_NAME_BYTES];
    unsigned grid[3], block[3];
    unsigned shared_bytes;
    unsigned max_threads; /* the kernel's __launch_bounds__ (x * y * z); 0 when it has none */
    int gemm_group, gemm_first, gemm_count; /* the GEMM kernels' int arguments; -1 otherwise */
} fake_cuda_launch_record;

typedef struct fake_function {
    struct fake_function *next;
    char name[FAKE_NAME_BYTES];
    unsigned max_threads;
} fake_function;

typedef struct fake_module {
    unsigned char *image;
    size_t size;
    fake_function *functions;
} fake_module;

static fake_cuda_launch_record launches[FAKE_MAX_LAUNCHES];
static int launch_count;
static unsigned long long next_address = 0x100000000ull;

/* ---- what the test reads ------------------------------------------------------------- */

int fake_cuda_launch_count(void);
const fake_cuda_launch_record *fake_cuda_launch(int index);
void fake_cuda_reset(void);

int fake_cuda_launch_count(void) { return launch_count; }

const fake_cuda_launch_record *fake_cuda_launch(int index) {
    return index >= 0 && index < launch_count && index < FAKE_MAX_LAUNCHES ? &launches[index] : NULL;
}

void fake_cuda_reset(void) { launch_count = 0; }

/* ---- device and context ------------------------------------------------------------------ */

int cuInit(unsigned flags);
int cuDriverGetVersion(int *version);
int cuDeviceGetCount(int *count);
int cuDeviceGet(int *device, int ordinal);
int cuDeviceGetName(char *name, int length, int device);
int cuDeviceGetAttribute(int *value, int attribute, int device);
int cuDeviceTotalMem_v2(size_t *bytes, int device);
int cuGetErrorName(int result, const char **name);
int cuGetErrorString(int result, const char **text);
int cuDevicePrimaryCtxRetain(void **context, int device);
int cuDevicePrimaryCtxRelease_v2(int device);
int cuCtxSetCurrent(void *context);
int cuCtxSynchronize(void);

int cuInit(unsigned flags) {
    (void)flags;
    return CUDA_SUCCESS;
}

int cuDriverGetVersion(int *version) {
    *version = 13000;
    return CUDA_SUCCESS;
}

int cuDeviceGetCount(int *count) {
    *count = 1;
    return CUDA_SUCCESS;
}

int cuDeviceGet(int *device, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE;
    *device = 0;
    return CUDA_SUCCESS;
}

int cuDeviceGetName(char *name, int length, int device) {
    (void)device;
    snprintf(name, (size_t)length, "Fake GPU %s", getenv("FAKE_CUDA_CC") ? getenv("FAKE_CUDA_CC") : "9.0");
    return CUDA_SUCCESS;
}

int cuDeviceGetAttribute(int *value, int attribute, int device) {
    int major = 9, minor = 0;
    const char *cc = getenv("FAKE_CUDA_CC");
    (void)device;
    if (cc && sscanf(cc, "%d.%d", &major, &minor) != 2) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
    case 75: *value = major; break;     /* compute capability */
    case 76: *value = minor; break;
    case 16: *value = 132; break;       /* multiprocessors */
    case 1: *value = 1024; break;       /* threads per block */
    case 8: *value = 49152; break;      /* shared memory per block */
    case 97: *value = 232448; break;    /* ... after opting in */
    case 81: *value = 233472; break;    /* ... per multiprocessor */
    case 38: *value = 50 << 20; break;  /* L2 */
    default: *value = 1; break;
    }
    return CUDA_SUCCESS;
}

int cuDeviceTotalMem_v2(size_t *bytes, int device) {
    (void)device;
    *bytes = (size_t)80 << 30;
    return CUDA_SUCCESS;
}

int cuGetErrorName(int result, const char **name) {
    if (result != CUDA_ERROR_NOT_FOUND) return CUDA_ERROR_INVALID_VALUE;
    *name = "CUDA_ERROR_NOT_FOUND";
    return CUDA_SUCCESS;
}

int cuGetErrorString(int result, const char **text) {
    if (result != CUDA_ERROR_NOT_FOUND) return CUDA_ERROR_INVALID_VALUE;
    *text = "named symbol not found (fake)";
    return CUDA_SUCCESS;
}

static int the_context;

int cuDevicePrimaryCtxRetain(void **context, int device) {
    (void)device;
    *context = &the_context;
    return CUDA_SUCCESS;
}

int cuDevicePrimaryCtxRelease_v2(int device) {
    (void)device;
    return CUDA_SUCCESS;
}

int cuCtxSetCurrent(void *context) { return context == &the_context ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }

int cuCtxSynchronize(void) { return CUDA_SUCCESS; }

/* ---- modules ------------------------------------------------------------------------------ */

int cuModuleLoadData(fake_module **module, const void *image);
int cuModuleUnload(fake_module *module);
int cuModuleGetFunction(fake_function **function, fake_module *module, const char *name);

/* Bytes of a 64-bit ELF image: up to the end of its furthest header table or section. */
static size_t elf_size(const unsigned char *image) {
    Elf64_Ehdr header;
    memcpy(&header, image, sizeof header);
    size_t end = (size_t)header.e_shoff + (size_t)header.e_shnum * header.e_shentsize;
    size_t program_end = (size_t)header.e_phoff + (size_t)header.e_phnum * header.e_phentsize;
    if (program_end > end) end = program_end;
    for (unsigned index = 0; index < header.e_shnum; index++) {
        Elf64_Shdr section;
        memcpy(&section, image + header.e_shoff + (size_t)index * header.e_shentsize, sizeof section);
        if (section.sh_type != SHT_NOBITS && section.sh_offset + section.sh_size > end)
            end = (size_t)(section.sh_offset + section.sh_size);
    }
    return end;
}

int cuModuleLoadData(fake_module **module, const void *image) {
    const unsigned char *bytes = image;
    if (!image || memcmp(bytes, ELFMAG, SELFMAG) != 0 || bytes[EI_CLASS] != ELFCLASS64)
        return CUDA_ERROR_INVALID_IMAGE;
    Elf64_Ehdr header;
    memcpy(&header, bytes, sizeof header);
    if (header.e_machine != EM_CUDA_MACHINE || header.e_shentsize != sizeof(Elf64_Shdr))
        return CUDA_ERROR_INVALID_IMAGE;
    fake_module *loaded = calloc(1, sizeof *loaded);
    if (!loaded) return CUDA_ERROR_OUT_OF_MEMORY;
    loaded->size = elf_size(bytes);
    loaded->image = malloc(loaded->size);
    if (!loaded->image) {
        free(loaded);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memcpy(loaded->image, bytes, loaded->size);
    *module = loaded;
    return CUDA_SUCCESS;
}

int cuModuleUnload(fake_module *module) {
    if (!module) return CUDA_ERROR_INVALID_VALUE;
    while (module->functions) {
        fake_function *next = module->functions->next;
        free(module->functions);
        module->functions = next;
    }
    free(module->image);
    free(module);
    return CUDA_SUCCESS;
}

/* 1 when the module's symbol table has a function symbol called `name`. */
static int has_function(const fake_module *module, const char *name) {
    Elf64_Ehdr header;
    memcpy(&header, module->image, sizeof header);
    for (unsigned index = 0; index < header.e_shnum; index++) {
        Elf64_Shdr symbols, strings;
        memcpy(&symbols, module->image + header.e_shoff + (size_t)index * sizeof symbols, sizeof symbols);
        if (symbols.sh_type != SHT_SYMTAB || symbols.sh_link >= header.e_shnum) continue;
        memcpy(&strings, module->image + header.e_shoff + (size_t)symbols.sh_link * sizeof strings,
               sizeof strings);
        for (size_t at = 0; at + sizeof(Elf64_Sym) <= symbols.sh_size; at += sizeof(Elf64_Sym)) {
            Elf64_Sym symbol;
            memcpy(&symbol, module->image + symbols.sh_offset + at, sizeof symbol);
            if (ELF64_ST_TYPE(symbol.st_info) != STT_FUNC || symbol.st_name >= strings.sh_size) continue;
            const char *symbol_name = (const char *)module->image + strings.sh_offset + symbol.st_name;
            if (strcmp(symbol_name, name) == 0) return 1;
        }
    }
    return 0;
}

/* Section `index` of the module's image. */
static Elf64_Shdr section_header(const fake_module *module, unsigned index) {
    Elf64_Ehdr header;
    Elf64_Shdr section;
    memcpy(&header, module->image, sizeof header);
    memcpy(&section, module->image + header.e_shoff + (size_t)index * sizeof section, sizeof section);
    return section;
}

/* The kernel's maximum threads per block from __launch_bounds__: the EIATTR_MAX_THREADS
 * attribute (0x05, three 32-bit dimensions) of section ".nv.info.<name>"; 0 if absent.
 * Attributes are {u8 format, u8 attribute, u16 value}, followed by `value` bytes when the
 * format is EIFMT_SVAL (0x04). */
static unsigned launch_bound(const fake_module *module, const char *name) {
    Elf64_Ehdr header;
    memcpy(&header, module->image, sizeof header);
    const Elf64_Shdr names = section_header(module, header.e_shstrndx);
    char wanted[FAKE_NAME_BYTES + 16];
    snprintf(wanted, sizeof wanted, ".nv.info.%s", name);
    for (unsigned index = 0; index < header.e_shnum; index++) {
        const Elf64_Shdr info = section_header(module, index);
        if (info.sh_name >= names.sh_size ||
            strcmp((const char *)module->image + names.sh_offset + info.sh_name, wanted) != 0)
            continue;
        const unsigned char *data = module->image + info.sh_offset;
        for (size_t at = 0; at + 4 <= info.sh_size;) {
            const unsigned format = data[at], attribute = data[at + 1];
            const unsigned value = data[at + 2] | (unsigned)data[at + 3] << 8;
            at += 4;
            if (format == 0x04 && attribute == 0x05 && value == 12 && at + 12 <= info.sh_size) {
                uint32_t dims[3];
                memcpy(dims, data + at, sizeof dims);
                return dims[0] * dims[1] * dims[2];
            }
            if (format == 0x04) at += value;
        }
    }
    return 0;
}

static int ends_with(const char *text, const char *suffix) {
    size_t length = strlen(text), suffix_length = strlen(suffix);
    return suffix_length <= length && strcmp(text + length - suffix_length, suffix) == 0;
}

int cuModuleGetFunction(fake_function **function, fake_module *module, const char *name) {
    const char *hide = getenv("FAKE_CUDA_HIDE");
    if (!module || !name || strlen(name) >= FAKE_NAME_BYTES) return CUDA_ERROR_INVALID_VALUE;
    if (!has_function(module, name) || (hide && hide[0] && ends_with(name, hide))) return CUDA_ERROR_NOT_FOUND;
    fake_function *found = calloc(1, sizeof *found);
    if (!found) return CUDA_ERROR_OUT_OF_MEMORY;
    snprintf(found->name, sizeof found->name, "%s", name);
    found->max_threads = launch_bound(module, name);
    found->next = module->functions;
    module->functions = found;
    *function = found;
    return CUDA_SUCCESS;
}

/* ---- launches and memory ------------------------------------------------------------------ */

int cuLaunchKernel(fake_function *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                   unsigned block_x, unsigned block_y, unsigned block_z, unsigned shared_bytes,
                   void *stream, void **parameters, void **extra);
int cuMemAlloc_v2(unsigned long long *pointer, size_t bytes);
int cuMemFree_v2(unsigned long long pointer);
int cuMemsetD8Async(unsigned long long destination, unsigned char value, size_t count, void *stream);
int cuMemsetD32Async(unsigned long long destination, unsigned value, size_t count, void *stream);
int cuMemcpyDtoHAsync_v2(void *destination, unsigned long long source, size_t bytes, void *stream);
int cuStreamSynchronize(void *stream);
int cuMemcpyDtoDAsync_v2(unsigned long long destination, unsigned long long source, size_t bytes, void *stream);

int cuLaunchKernel(fake_function *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                   unsigned block_x, unsigned block_y, unsigned block_z, unsigned shared_bytes,
                   void *stream, void **parameters, void **extra) {
    (void)stream;
    if (!function || !parameters || extra || grid_x == 0 || grid_y == 0 || grid_z == 0 || block_x == 0 ||
        block_y == 0 || block_z == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (function->max_threads && block_x * block_y * block_z > function->max_threads)
        return CUDA_ERROR_INVALID_VALUE; /* what the driver says to a block over __launch_bounds__ */
    if (launch_count < FAKE_MAX_LAUNCHES) {
        fake_cuda_launch_record *record = &launches[launch_count];
        snprintf(record->name, sizeof record->name, "%s", function->name);
        record->grid[0] = grid_x, record->grid[1] = grid_y, record->grid[2] = grid_z;
        record->block[0] = block_x, record->block[1] = block_y, record->block[2] = block_z;
        record->shared_bytes = shared_bytes;
        record->max_threads = function->max_threads;
        record->gemm_group = record->gemm_first = record->gemm_count = -1;
        if (ends_with(function->name, "_gemm1") || ends_with(function->name, "_gemm2") ||
            ends_with(function->name, "_bwd_pre") || ends_with(function->name, "_bwd_dh") ||
            ends_with(function->name, "_bwd_du") || (ends_with(function->name, "_bwd_weights") &&
                                                      !ends_with(function->name, "_bwd_dense_weights"))) {
            record->gemm_group = *(const int *)parameters[1];
            record->gemm_first = *(const int *)parameters[2];
            record->gemm_count = *(const int *)parameters[3];
        } else if (ends_with(function->name, "_bwd_dense_weights")) {
            record->gemm_group = *(const int *)parameters[1]; /* which dense tensor */
        }
    }
    launch_count++;
    return CUDA_SUCCESS;
}

int cuMemAlloc_v2(unsigned long long *pointer, size_t bytes) {
    *pointer = next_address;
    next_address += (bytes + 0xffffull) & ~0xffffull;
    return CUDA_SUCCESS;
}

int cuMemFree_v2(unsigned long long pointer) { return pointer ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }

int cuMemsetD8Async(unsigned long long destination, unsigned char value, size_t count, void *stream) {
    (void)value, (void)count, (void)stream;
    return destination ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

int cuMemsetD32Async(unsigned long long destination, unsigned value, size_t count, void *stream) {
    (void)value, (void)count, (void)stream;
    return destination ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

int cuMemcpyDtoHAsync_v2(void *destination, unsigned long long source, size_t bytes, void *stream) {
    (void)stream;
    if (!source) return CUDA_ERROR_INVALID_VALUE;
    memset(destination, 0, bytes);
    return CUDA_SUCCESS;
}

int cuMemcpyDtoDAsync_v2(unsigned long long destination, unsigned long long source, size_t bytes, void *stream) {
    (void)bytes, (void)stream;
    return destination && source ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

int cuStreamSynchronize(void *stream) {
    (void)stream;
    return CUDA_SUCCESS;
}

/* ---- the rest of what moegen_cuda_open binds: present, never expected to be called ---- */

#define UNUSED_SYMBOL(name) \
    int name(void);         \
    int name(void) { return CUDA_ERROR_UNKNOWN; }

UNUSED_SYMBOL(cuCtxGetCurrent)
UNUSED_SYMBOL(cuCtxPushCurrent_v2)
UNUSED_SYMBOL(cuCtxPopCurrent_v2)
UNUSED_SYMBOL(cuModuleGetGlobal_v2)
UNUSED_SYMBOL(cuFuncGetAttribute)
UNUSED_SYMBOL(cuFuncSetAttribute)
UNUSED_SYMBOL(cuMemGetInfo_v2)
UNUSED_SYMBOL(cuMemAllocHost_v2)
UNUSED_SYMBOL(cuMemFreeHost)
UNUSED_SYMBOL(cuMemcpyHtoD_v2)
UNUSED_SYMBOL(cuMemcpyDtoH_v2)
UNUSED_SYMBOL(cuMemcpyHtoDAsync_v2)
UNUSED_SYMBOL(cuMemsetD8_v2)
UNUSED_SYMBOL(cuStreamCreate)
UNUSED_SYMBOL(cuStreamDestroy_v2)
UNUSED_SYMBOL(cuStreamQuery)
UNUSED_SYMBOL(cuStreamWaitEvent)
UNUSED_SYMBOL(cuEventCreate)
UNUSED_SYMBOL(cuEventDestroy_v2)
UNUSED_SYMBOL(cuEventRecord)
UNUSED_SYMBOL(cuEventQuery)
UNUSED_SYMBOL(cuEventSynchronize)
UNUSED_SYMBOL(cuEventElapsedTime_v2)
