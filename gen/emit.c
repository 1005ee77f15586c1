/* emit.c — spec + variant -> parameter tree -> rendered files (see emit.h).
 *
 * The parameter tree has three read-only globals for templates:
 *   spec     every resolved spec field under its YAML name (enum values as their
 *            YAML strings), plus derived sizes (ffn_rows, gated, ...), the
 *            sanitized identifier `ident` and the canonical hash;
 *   variant  the backend's tile choices and the variant name;
 *   gen      generator facts: version, ABI version, symbol prefix, file names.
 */
#include "emit.h"
#include "c_locale.h"

#include "capacity.h"
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MOEGEN_VERSION_STRING
#define MOEGEN_VERSION_STRING "0.0.0"
#endif

#define ABI_HEADER_PATH "templates/common/moegen_kernel_abi.h"
#define CUDA_ABI_HEADER_PATH "templates/common/moegen_cuda_abi.h"
#define CUDA_LAUNCH_HEADER_PATH "templates/common/moegen_cuda_launch.h"

/* Build spec.* params. Returns 0 or -1 on out of memory. */
static int add_spec_params(moegen_params *root, const moegen_spec *spec, const char *hash) {
    moegen_params *s = moegen_params_table(root, "spec");
    if (!s) return -1;
    int gated = moegen_activation_is_gated(spec->activation);
    int rc = 0;
    rc |= moegen_params_str(s, "ident", spec->ident);
    rc |= moegen_params_str(s, "hash", hash);
    rc |= moegen_params_str(s, "semantics", moegen_semantics_name(spec->semantics));
    rc |= moegen_params_int(s, "num_experts", spec->num_experts);
    rc |= moegen_params_int(s, "top_k", spec->top_k);
    rc |= moegen_params_int(s, "hidden_size", spec->hidden_size);
    rc |= moegen_params_int(s, "ffn_size", spec->moe_intermediate_size);
    rc |= moegen_params_int(s, "ffn_rows", moegen_spec_ffn_rows(spec));
    rc |= moegen_params_str(s, "activation", moegen_activation_name(spec->activation));
    rc |= moegen_params_bool(s, "gated", gated);
    rc |= moegen_params_str(s, "dtype", moegen_dtype_name(spec->dtype));
    rc |= moegen_params_int(s, "ep_size", spec->ep_size);
    rc |= moegen_params_str(s, "mode", moegen_mode_name(spec->mode));
    rc |= moegen_params_bool(s, "expert_bias", spec->expert_bias);
    rc |= moegen_params_bool(s, "weight_on_input", spec->weight_on_input);
    rc |= moegen_params_bool(s, "use_residual", spec->use_residual);

    const moegen_router_spec *r = &spec->router;
    moegen_params *router = moegen_params_table(s, "router");
    if (!router) return -1;
    rc |= moegen_params_str(router, "score_function", moegen_score_fn_name(r->score_function));
    rc |= moegen_params_str(router, "order", moegen_order_name(r->order));
    rc |= moegen_params_bool(router, "norm_topk_prob", r->norm_topk_prob);
    rc |= moegen_params_num(router, "routed_scaling_factor", r->routed_scaling_factor);
    rc |= moegen_params_int(router, "n_group", r->n_group);
    rc |= moegen_params_int(router, "topk_group", r->topk_group);
    rc |= moegen_params_int(router, "group_topm", r->group_topm);
    rc |= moegen_params_str(router, "group_score", moegen_group_score_name(r->group_score));
    rc |= moegen_params_str(router, "group_mask", moegen_group_mask_name(r->group_mask));
    rc |= moegen_params_bool(router, "score_bias", r->score_bias);
    rc |= moegen_params_bool(router, "router_bias", r->router_bias);
    rc |= moegen_params_num(router, "input_jitter", r->input_jitter);
    rc |= moegen_params_str(router, "noise", moegen_noise_name(r->noise));
    /* The seed is a full uint64; Lua integers are int64, so pass it as two halves. */
    rc |= moegen_params_int(router, "seed_hi", (int64_t)(r->seed >> 32));
    rc |= moegen_params_int(router, "seed_lo", (int64_t)(r->seed & 0xffffffffu));
    rc |= moegen_params_str(router, "aux_loss", moegen_aux_loss_name(r->aux_loss));

    const moegen_capacity_spec *c = &spec->capacity;
    moegen_params *cap = moegen_params_table(s, "capacity");
    if (!cap) return -1;
    rc |= moegen_params_str(cap, "mode", moegen_capacity_mode_name(c->mode));
    rc |= moegen_params_num(cap, "capacity_factor", c->capacity_factor);
    rc |= moegen_params_num(cap, "eval_capacity_factor", c->eval_capacity_factor);
    /* The factor in force for the spec's mode and the DeepSpeed formula's fp32 scale,
     * from gen/capacity.c, the one home of the capacity rule. */
    rc |= moegen_params_num(cap, "factor", moegen_spec_capacity_factor(spec));
    rc |= moegen_params_num(cap, "deepspeed_scale", moegen_spec_deepspeed_capacity_scale(spec));
    rc |= moegen_params_int(cap, "expert_capacity", c->expert_capacity);
    rc |= moegen_params_int(cap, "min_capacity", c->min_capacity);
    rc |= moegen_params_str(cap, "formula", moegen_capacity_formula_name(c->formula));
    rc |= moegen_params_str(cap, "priority", moegen_priority_name(c->priority));
    rc |= moegen_params_bool(cap, "renormalize", c->renormalize);
    rc |= moegen_params_bool(cap, "pad_to_capacity", c->pad_to_capacity);

    const moegen_shared_spec *sh = &spec->shared;
    moegen_params *shared = moegen_params_table(s, "shared");
    if (!shared) return -1;
    int64_t shared_rows = sh->count > 0 ? (gated ? 2 * sh->intermediate_size : sh->intermediate_size) : 0;
    rc |= moegen_params_int(shared, "count", sh->count);
    rc |= moegen_params_int(shared, "ffn_size", sh->count > 0 ? sh->intermediate_size : 0);
    rc |= moegen_params_int(shared, "ffn_rows", shared_rows);
    rc |= moegen_params_bool(shared, "gate", sh->gate);
    return rc ? -1 : 0;
}

static int add_variant_params(moegen_params *root, const moegen_variant *v, const char *name) {
    moegen_params *p = moegen_params_table(root, "variant");
    if (!p) return -1;
    int rc = 0;
    rc |= moegen_params_str(p, "name", name);
    rc |= moegen_params_str(p, "backend", v->backend == MOEGEN_BACKEND_CPU ? "cpu" : "cuda");
    moegen_params *cpu = moegen_params_table(p, "cpu"), *cuda = moegen_params_table(p, "cuda");
    if (!cpu || !cuda) return -1;
    int n_fields;
    const moegen_variant_field *fields = moegen_variant_fields(&n_fields);
    for (int i = 0; i < n_fields; i++) { /* variant.cpu.<name>, variant.cuda.<name> */
        moegen_params *table = fields[i].backend == MOEGEN_BACKEND_CPU ? cpu : cuda;
        const int value = moegen_variant_get(v, &fields[i]);
        if (fields[i].is_gemm) {
            const char *gemm = moegen_cpu_gemm_name((moegen_cpu_gemm)value);
            rc |= moegen_params_str(table, fields[i].name, gemm ? gemm : "unknown");
        } else {
            rc |= moegen_params_int(table, fields[i].name, value);
        }
    }
    return rc ? -1 : 0;
}

static int add_gen_params(moegen_params *root, const char *prefix, const char *source_name,
                          const char *header_name, const char *build_id) {
    moegen_params *g = moegen_params_table(root, "gen");
    if (!g) return -1;
    int rc = 0;
    rc |= moegen_params_str(g, "build_id", build_id);
    rc |= moegen_params_str(g, "version", MOEGEN_VERSION_STRING);
    rc |= moegen_params_int(g, "abi_version", 1);
    rc |= moegen_params_str(g, "prefix", prefix);
    rc |= moegen_params_str(g, "source_name", source_name);
    rc |= moegen_params_str(g, "header_name", header_name);
    return rc ? -1 : 0;
}

/* Render one template into out->files[out->n_files]. */
static moegen_status render_into(const moegen_template_set *set, const char *entry,
                                 moegen_params *params, const char *file_name,
                                 moegen_generated *out, moegen_error *err) {
    moegen_generated_file *f = &out->files[out->n_files];
    moegen_params *g = moegen_params_table(params, "gen");
    if (!g || moegen_params_str(g, "template", entry))
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    moegen_status st = moegen_template_render_mapped(set, entry, params, NULL, &f->text, &f->len, &f->origins,
                                                     &f->n_origins, err);
    if (st != MOEGEN_OK) return st;
    snprintf(f->name, sizeof f->name, "%s", file_name);
    out->n_files++;
    return MOEGEN_OK;
}

/* Copy a file of the template set verbatim (the kernel ABI header). */
static moegen_status copy_into(const moegen_template_set *set, const char *path,
                               const char *file_name, moegen_generated *out, moegen_error *err) {
    const moegen_template_file *src = moegen_template_set_find(set, path);
    if (!src)
        return moegen_error_set(err, MOEGEN_ERR_TEMPLATE, 0, "%s: missing from the template set",
                                path);
    moegen_generated_file *f = &out->files[out->n_files];
    f->text = malloc(src->len + 1);
    if (!f->text) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    memcpy(f->text, src->text, src->len);
    f->text[src->len] = '\0';
    f->len = src->len;
    snprintf(f->name, sizeof f->name, "%s", file_name);
    out->n_files++;
    return MOEGEN_OK;
}

/* What one generation is made of: the spec, the variant, the generator's version and every
 * template file. Generated code carries the first 16 hex digits as its build pin (emit.h). */
static void build_id(const moegen_template_set *templates, const char *spec_hash, const char *variant_name,
                     char out[MOEGEN_BUILD_ID_CHARS + 1]) {
    moegen_sha256 h;
    moegen_sha256_init(&h);
    moegen_sha256_update(&h, spec_hash, strlen(spec_hash) + 1);
    moegen_sha256_update(&h, variant_name, strlen(variant_name) + 1);
    moegen_sha256_update(&h, MOEGEN_VERSION_STRING, sizeof MOEGEN_VERSION_STRING);
    for (size_t i = 0; i < templates->count; i++) {
        moegen_sha256_update(&h, templates->files[i].path, strlen(templates->files[i].path) + 1);
        moegen_sha256_update(&h, templates->files[i].text, templates->files[i].len);
    }
    char hex[65];
    moegen_sha256_final_hex(&h, hex);
    memcpy(out, hex, MOEGEN_BUILD_ID_CHARS);
    out[MOEGEN_BUILD_ID_CHARS] = '\0';
}

static moegen_status generate(const moegen_spec *spec, const moegen_variant *variant,
                              const moegen_template_set *templates, moegen_generated *out,
                              moegen_error *err) {
    memset(out, 0, sizeof *out);
    if (!templates) templates = moegen_builtin_templates();
    moegen_status st = moegen_variant_check(spec, variant, err);
    if (st != MOEGEN_OK) return st;

    out->variant = *variant;
    moegen_spec_hash(spec, out->spec_hash);
    moegen_variant_name(spec, variant, out->variant_name, sizeof out->variant_name);
    snprintf(out->symbol_prefix, sizeof out->symbol_prefix, "moe_%s", spec->ident);
    build_id(templates, out->spec_hash, out->variant_name, out->build_id);
    const int cuda = variant->backend == MOEGEN_BACKEND_CUDA;
    char source_name[128], header_name[128];
    snprintf(source_name, sizeof source_name, "%s.%s", out->symbol_prefix, cuda ? "cu" : "c");
    snprintf(header_name, sizeof header_name, "%s.h", out->symbol_prefix);

    moegen_params *params = moegen_params_new();
    if (!params || add_spec_params(params, spec, out->spec_hash) ||
        add_variant_params(params, variant, out->variant_name) ||
        add_gen_params(params, out->symbol_prefix, source_name, header_name, out->build_id)) {
        moegen_params_free(params);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory building template parameters");
    }
    out->main_file = 0;
    if (cuda) {
        st = render_into(templates, "templates/cuda/layer.cu.tpl", params, source_name, out, err);
        if (st == MOEGEN_OK)
            st = render_into(templates, "templates/cuda/layer.h.tpl", params, header_name, out, err);
        if (st == MOEGEN_OK)
            st = copy_into(templates, CUDA_ABI_HEADER_PATH, "moegen_cuda_abi.h", out, err);
        if (st == MOEGEN_OK)
            st = copy_into(templates, CUDA_LAUNCH_HEADER_PATH, "moegen_cuda_launch.h", out, err);
    } else {
        st = render_into(templates, "templates/cpu/layer.c.tpl", params, source_name, out, err);
        if (st == MOEGEN_OK)
            st = render_into(templates, "templates/cpu/layer.h.tpl", params, header_name, out, err);
    }
    if (st == MOEGEN_OK)
        st = copy_into(templates, ABI_HEADER_PATH, "moegen_kernel_abi.h", out, err);
    moegen_params_free(params);
    if (st != MOEGEN_OK) moegen_generated_free(out);
    return st;
}

/* The public entry point runs in the C locale (gen/c_locale.h). */
moegen_status moegen_generate(const moegen_spec *spec, const moegen_variant *variant,
                              const moegen_template_set *templates, moegen_generated *out,
                              moegen_error *err) {
    moegen_c_locale_scope scope;
    moegen_c_locale_enter(&scope);
    moegen_status result = generate(spec, variant, templates, out, err);
    moegen_c_locale_leave(&scope);
    return result;
}

void moegen_generated_free(moegen_generated *gen) {
    if (!gen) return;
    for (int i = 0; i < gen->n_files; i++) {
        free(gen->files[i].text);
        free(gen->files[i].origins);
    }
    gen->n_files = 0;
}

void moegen_generated_annotate(const moegen_generated *gen, moegen_error *err) {
    if (!err || gen->n_files == 0) return;
    const moegen_generated_file *f = &gen->files[gen->main_file];
    const char *at = strstr(err->message, f->name);
    if (!at) return;
    const char *p = at + strlen(f->name);
    if (*p != '(' && *p != ':') return; /* "x.cu(123): error" (NVRTC) or "x.c:123:5: error" (cc) */
    char *end = NULL;
    long line = strtol(p + 1, &end, 10);
    char origin[256];
    if (end == p + 1 || !moegen_generated_origin(f, line, origin, sizeof origin)) return;
    size_t used = strlen(err->message);
    snprintf(err->message + used, sizeof err->message - used, " [%s line %ld comes from %s]", f->name, line, origin);
}

const char *moegen_generated_origin(const moegen_generated_file *file, long line, char *buf, size_t size) {
    if (line < 1 || (size_t)line > file->n_origins || !file->origins[line - 1].path) return NULL;
    snprintf(buf, size, "%s:%d", file->origins[line - 1].path, file->origins[line - 1].line);
    return buf;
}

/* Does `path` hold exactly `len` bytes equal to `text`? 1 yes, 0 no (or missing), -1
 * when it exists but is not a regular file: a FIFO, device or socket there (or a
 * symlink to one) is never opened for a blocking read and never replaced. */
static int file_has_content(const char *path, const char *text, size_t len) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        struct stat st; /* a FIFO without a writer opens fine; ENXIO etc. mean a special file */
        return lstat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode) ? -1 : 0;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    int same = (size_t)st.st_size == len;
    char buf[65536];
    size_t off = 0;
    while (same) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (off + (size_t)n > len || memcmp(buf, text + off, (size_t)n) != 0) same = 0;
        off += (size_t)n;
    }
    close(fd);
    return same && off == len;
}

static moegen_status write_atomically(const char *path, const char *text, size_t len,
                                      moegen_error *err) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    (void)unlink(tmp); /* a leftover of a crashed run (never written through: O_EXCL below) */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return moegen_error_set(err, MOEGEN_ERR_IO, errno, "%s: %s", tmp, strerror(errno));
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            unlink(tmp);
            return moegen_error_set(err, MOEGEN_ERR_IO, e, "%s: %s", tmp, strerror(e));
        }
        off += (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        int e = errno;
        unlink(tmp);
        return moegen_error_set(err, MOEGEN_ERR_IO, e, "%s: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return moegen_error_set(err, MOEGEN_ERR_IO, e, "%s: %s", path, strerror(e));
    }
    return MOEGEN_OK;
}

/* mkdir -p `dir` (0755 less the umask); 0, or -1 with errno. */
static int make_directories(const char *dir) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(path, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

moegen_status moegen_generated_write(const moegen_generated *gen, const char *dir, int *n_written,
                                     moegen_error *err) {
    if (n_written) *n_written = 0;
    if (make_directories(dir) != 0)
        return moegen_error_set(err, MOEGEN_ERR_IO, errno, "%s: %s", dir, strerror(errno));
    for (int i = 0; i < gen->n_files; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, gen->files[i].name);
        const int same = file_has_content(path, gen->files[i].text, gen->files[i].len);
        if (same < 0)
            return moegen_error_set(err, MOEGEN_ERR_IO, 0,
                                    "%s exists and is not a regular file (a FIFO, device or socket); moegen "
                                    "neither reads nor replaces it: remove it or write elsewhere",
                                    path);
        if (same) continue;
        moegen_status st = write_atomically(path, gen->files[i].text, gen->files[i].len, err);
        if (st != MOEGEN_OK) return st;
        if (n_written) (*n_written)++;
    }
    return MOEGEN_OK;
}
