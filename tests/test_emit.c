/* test_emit.c — the generator (gen/emit.c with the built-in templates): golden sources
 * for the shipped specs, byte-identical output across processes and across reordered /
 * re-commented specs, free text never reaching generated code, every generated file
 * compiling without warnings, variant checks, and template errors surfacing with their
 * template line.
 *
 * Golden files live in tests/golden/<spec name>/. To accept a deliberate change of the
 * templates, run with MOEGEN_UPDATE_GOLDEN=1 and review the diff.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "emit.h"
#include "spec.h"
#include "template.h"
#include "variant.h"
#include "test_support.h"

static const char *SHIPPED[] = {"demo", "mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b",
                                "olmoe-1b-7b", "deepseek-v3", "switch-base-8"};

static const char *source_dir(void) {
    const char *dir = getenv("MOEGEN_SOURCE_DIR");
    return dir ? dir : ".";
}

static void load_spec(const char *path, moegen_spec *spec) {
    moegen_error err;
    if (moegen_spec_load_file(path, spec, &err) != MOEGEN_OK) fail_msg("%s", err.message);
}

static void parse_spec(const char *yaml, moegen_spec *spec) {
    moegen_error err;
    if (moegen_spec_parse(yaml, strlen(yaml), "test", spec, &err) != MOEGEN_OK) fail_msg("%s", err.message);
}

/* Generate for a SIMD width (4, 8 or 16 floats). */
static void generate_for(const moegen_spec *spec, int vector_floats, moegen_generated *out) {
    moegen_target target = {.cpu_vector_floats = vector_floats};
    moegen_variant variant;
    moegen_variant_default(spec, MOEGEN_BACKEND_CPU, &target, &variant);
    moegen_error err;
    if (moegen_generate(spec, &variant, NULL, out, &err) != MOEGEN_OK) fail_msg("generate: %s", err.message);
}

/* Generate with the fixed target the golden files use (8-float vectors). */
static void generate(const moegen_spec *spec, moegen_generated *out) { generate_for(spec, 8, out); }

/* Compiler flags that enable a SIMD width (what runtime/host_cc.c passes). */
static const char *isa_flags(int vector_floats) {
    if (vector_floats == 16) return "-mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c -mavx512bf16";
    if (vector_floats == 8) return "-mavx2 -mfma -mf16c";
    return "";
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)size + 1);
    size_t n = fread(text, 1, (size_t)size, f);
    fclose(f);
    text[n] = '\0';
    *len = n;
    return text;
}

static void generated_sources_match_the_golden_files(void **state) {
    (void)state;
    const int update = getenv("MOEGEN_UPDATE_GOLDEN") != NULL;
    for (size_t i = 0; i < sizeof SHIPPED / sizeof SHIPPED[0]; i++) {
        char path[1024], dir[1024];
        snprintf(path, sizeof path, "%s/specs/%s.yaml", source_dir(), SHIPPED[i]);
        snprintf(dir, sizeof dir, "%s/tests/golden/%s", source_dir(), SHIPPED[i]);
        moegen_spec spec;
        load_spec(path, &spec);
        moegen_generated gen;
        generate(&spec, &gen);
        if (update) {
            moegen_error err;
            mkdir(dir, 0755);
            assert_int_equal(moegen_generated_write(&gen, dir, NULL, &err), MOEGEN_OK);
        }
        for (int f = 0; f < gen.n_files; f++) {
            char golden_path[1200];
            snprintf(golden_path, sizeof golden_path, "%s/%s", dir, gen.files[f].name);
            size_t len = 0;
            char *golden = read_file(golden_path, &len);
            if (!golden) fail_msg("%s is missing (run with MOEGEN_UPDATE_GOLDEN=1)", golden_path);
            if (len != gen.files[f].len || memcmp(golden, gen.files[f].text, len) != 0)
                fail_msg("%s differs from the generated file (templates changed? rerun with "
                         "MOEGEN_UPDATE_GOLDEN=1 and review the diff)", golden_path);
            free(golden);
        }
        moegen_generated_free(&gen);
        moegen_spec_free(&spec);
    }
}

static void generation_is_byte_identical_across_processes(void **state) {
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/specs/deepseek-v3.yaml", source_dir());
    moegen_spec spec;
    load_spec(path, &spec);
    moegen_generated mine;
    generate(&spec, &mine);
    int pipe_fds[2];
    assert_int_equal(pipe(pipe_fds), 0);
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        close(pipe_fds[0]);
        moegen_generated theirs;
        generate(&spec, &theirs);
        size_t off = 0;
        const moegen_generated_file *f = &theirs.files[0];
        while (off < f->len) {
            ssize_t n = write(pipe_fds[1], f->text + off, f->len - off);
            if (n <= 0) _exit(1);
            off += (size_t)n;
        }
        _exit(0);
    }
    close(pipe_fds[1]);
    char *buf = malloc(mine.files[0].len + 1);
    size_t got = 0;
    ssize_t n;
    while (got <= mine.files[0].len && (n = read(pipe_fds[0], buf + got, mine.files[0].len + 1 - got)) > 0)
        got += (size_t)n;
    close(pipe_fds[0]);
    int status;
    waitpid(child, &status, 0);
    assert_int_equal(got, mine.files[0].len);
    assert_memory_equal(buf, mine.files[0].text, got);
    free(buf);
    moegen_generated_free(&mine);
    moegen_spec_free(&spec);
}

static void reordered_and_recommented_specs_generate_identical_code(void **state) {
    (void)state;
    const char *a = "name: same\nnum_experts: 8\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                    "moe_intermediate_size: 32\nrouter:\n  score_function: sigmoid\n  norm_topk_prob: true\n";
    const char *b = "# a comment\nrouter:\n    norm_topk_prob: true   # trailing comment\n"
                    "    score_function: sigmoid\nmoe_intermediate_size: 32\nhidden_size: 64\n"
                    "num_experts_per_tok: 2\n\n\nnum_experts: 8\nname: same\n";
    moegen_spec sa, sb;
    parse_spec(a, &sa);
    parse_spec(b, &sb);
    moegen_generated ga, gb;
    generate(&sa, &ga);
    generate(&sb, &gb);
    assert_int_equal(ga.n_files, gb.n_files);
    for (int f = 0; f < ga.n_files; f++) {
        assert_string_equal(ga.files[f].name, gb.files[f].name);
        assert_int_equal(ga.files[f].len, gb.files[f].len);
        assert_memory_equal(ga.files[f].text, gb.files[f].text, ga.files[f].len);
    }
    moegen_generated_free(&ga);
    moegen_generated_free(&gb);
    moegen_spec_free(&sa);
    moegen_spec_free(&sb);
}

static void free_text_never_reaches_generated_code(void **state) {
    (void)state;
    const char *yaml = "name: text\nsource: \"*/ #include <evil.h> system(\\\"x\\\")\"\n"
                       "description: \"*/ int pwned; /*\"\nnum_experts: 4\nnum_experts_per_tok: 1\n"
                       "hidden_size: 32\nmoe_intermediate_size: 16\n";
    moegen_spec spec;
    parse_spec(yaml, &spec);
    moegen_generated gen;
    generate(&spec, &gen);
    for (int f = 0; f < gen.n_files; f++) {
        assert_null(strstr(gen.files[f].text, "evil"));
        assert_null(strstr(gen.files[f].text, "pwned"));
        assert_null(strstr(gen.files[f].text, "system("));
    }
    moegen_generated_free(&gen);
    moegen_spec_free(&spec);
}

/* Write the files and compile the main one with every warning as an error. */
/* Compile the generated sources with -Werror and `flags` (isa_flags() and more). */
static void compile_strictly(const moegen_generated *gen, const char *flags, const char *label) {
    char dir[] = "/tmp/moegen-emit-XXXXXX";
    assert_non_null(mkdtemp(dir));
    moegen_error err;
    assert_int_equal(moegen_generated_write(gen, dir, NULL, &err), MOEGEN_OK);
    const char *cc = getenv("MOEGEN_CC") ? getenv("MOEGEN_CC") : "cc";
    char command[2048];
    snprintf(command, sizeof command,
             "%s -std=gnu11 -fsyntax-only -fopenmp %s -Wall -Wextra -Werror -Wshadow -I%s %s/%s 2>%s/log",
             cc, flags, dir, dir, gen->files[gen->main_file].name, dir);
    int rc = system(command);
    if (rc != 0) {
        char log_path[1100];
        snprintf(log_path, sizeof log_path, "%s/log", dir);
        size_t len;
        char *log = read_file(log_path, &len);
        fail_msg("%s: generated code does not compile cleanly:\n%.2000s", label, log ? log : "");
    }
    char cleanup[1200];
    snprintf(cleanup, sizeof cleanup, "rm -rf %s", dir);
    assert_int_equal(system(cleanup), 0);
}

static void every_shipped_spec_compiles_without_warnings(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof SHIPPED / sizeof SHIPPED[0]; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/specs/%s.yaml", source_dir(), SHIPPED[i]);
        moegen_spec spec;
        load_spec(path, &spec);
        moegen_generated gen;
        generate(&spec, &gen);
        compile_strictly(&gen, isa_flags(8), SHIPPED[i]);
        moegen_generated_free(&gen);
        moegen_spec_free(&spec);
    }
}

/* Every activation x dtype x routing family renders and compiles without warnings, at
 * every SIMD width. */
static void small_spec_matrix_compiles_without_warnings(void **state) {
    (void)state;
    for (size_t i = 0; i < FEATURE_MATRIX_SIZE; i++) {
        char yaml[1024];
        feature_matrix_case(i, "matrix", 32, yaml, sizeof yaml, NULL, 0);
        moegen_spec spec;
        parse_spec(yaml, &spec);
        moegen_generated gen;
        const int width = 4 << ((i / 3 + 2 * (i % 3)) % 3);
        generate_for(&spec, width, &gen);
        compile_strictly(&gen, isa_flags(width), yaml);
        moegen_generated_free(&gen);
        moegen_spec_free(&spec);
    }
}

static void variant_check_rejects_tiles_that_do_not_fit(void **state) {
    (void)state;
    moegen_spec spec;
    parse_spec("name: v\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 32\nmoe_intermediate_size: 16\n",
               &spec);
    moegen_variant variant;
    moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, NULL, &variant);
    moegen_error err;
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_OK);
    variant.cpu.tile_cols = 3;
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "tile_cols"));
    variant.cpu.tile_cols = 2;
    variant.cpu.block_cols = 63;
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "block_cols"));
    moegen_generated gen;
    assert_int_equal(moegen_generate(&spec, &variant, NULL, &gen, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    moegen_spec_free(&spec);
}

static void variant_overrides_set_named_fields_and_refuse_bad_items(void **state) {
    (void)state;
    moegen_spec spec;
    parse_spec("name: o\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 64\nmoe_intermediate_size: 32\n"
               "dtype: bf16\n",
               &spec);
    moegen_target target = {.cpu_vector_floats = 16};
    moegen_variant variant, before;
    moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
    assert_int_equal(variant.cpu.gemm, MOEGEN_CPU_GEMM_FMA); /* no bf16 dot on this target */
    moegen_error err;
    assert_int_equal(moegen_variant_apply_overrides(&variant, " tile_rows=6, block_rows=60,gemm=bfdot ", &err), MOEGEN_OK);
    assert_int_equal(variant.cpu.tile_rows, 6);
    assert_int_equal(variant.cpu.block_rows, 60);
    assert_int_equal(variant.cpu.gemm, MOEGEN_CPU_GEMM_BF16_DOT);
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_OK);
    char name[160];
    moegen_variant_name(&spec, &variant, name, sizeof name);
    assert_non_null(strstr(name, "_v16r6c4b60x64q64bfdot_"));
    assert_int_equal(moegen_variant_apply_overrides(&variant, NULL, &err), MOEGEN_OK);
    assert_int_equal(moegen_variant_apply_overrides(&variant, "", &err), MOEGEN_OK);
    before = variant;
    static const struct {
        const char *text, *expect;
    } BAD[] = {
        {"tile_rows=x", "tile_rows='x'"}, {"nope=1", "tile_rows"}, {"tile_rows", "'tile_rows'"},
        {"gemm=tf32", "one of fma, bfdot, amx, outer"}, {"tile_m=64", "tile_m=64"}, {"tile_rows=-1", "tile_rows='-1'"},
        {"tile_cols=2,tile_rows=", "tile_rows=''"},
    };
    for (size_t i = 0; i < sizeof BAD / sizeof BAD[0]; i++) {
        assert_int_equal(moegen_variant_apply_overrides(&variant, BAD[i].text, &err), MOEGEN_ERR_INVALID_ARGUMENT);
        if (!strstr(err.message, BAD[i].expect)) fail_msg("'%s': %s", BAD[i].text, err.message);
        assert_memory_equal(&variant, &before, sizeof variant); /* nothing applied */
    }
    /* Checked against the spec afterwards: vdpbf16ps needs bf16 and 16-float vectors. */
    assert_int_equal(moegen_variant_apply_overrides(&variant, "vector_floats=8", &err), MOEGEN_OK);
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "bfdot"));
    /* CUDA fields on a CUDA variant. */
    moegen_variant cuda;
    moegen_variant_default(&spec, MOEGEN_BACKEND_CUDA, NULL, &cuda);
    assert_int_equal(moegen_variant_apply_overrides(&cuda, "tile_m=128,stages=4", &err), MOEGEN_OK);
    assert_int_equal(cuda.cuda.tile_m, 128);
    assert_int_equal(cuda.cuda.stages, 4);
    assert_int_equal(moegen_variant_apply_overrides(&cuda, "tile_rows=2", &err), MOEGEN_ERR_INVALID_ARGUMENT);
    moegen_spec_free(&spec);
}

/* The AMX kernels: chosen by default for bf16 where the CPU has AMX and every k is a
 * multiple of 32, refused where a k is not, and compiled without warnings both with the
 * AMX flags (the tile path) and without them (the FMA fallback the layer then runs). */
static void amx_variant_is_chosen_where_it_fits_and_compiles_without_warnings(void **state) {
    (void)state;
    static const char *FITS[] = {
        "name: amx_gated\nnum_experts: 5\nnum_experts_per_tok: 3\nhidden_size: 96\n"
        "moe_intermediate_size: 64\ndtype: bf16\nexpert_bias: true\n",
        "name: amx_shared\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\n"
        "moe_intermediate_size: 32\ndtype: bf16\nshared_experts: {count: 2, intermediate_size: 96, gate: true}\n",
        "name: amx_plain\nsemantics: deepspeed\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 64\n"
        "moe_intermediate_size: 96\ndtype: bf16\nactivation: gelu\nuse_residual: true\n",
    };
    const moegen_target target = {.cpu_vector_floats = 16, .cpu_bf16_dot = 1, .cpu_amx = 1};
    char flags[512];
    snprintf(flags, sizeof flags, "%s -mamx-tile -mamx-bf16", isa_flags(16));
    for (size_t i = 0; i < sizeof FITS / sizeof FITS[0]; i++) {
        moegen_spec spec;
        parse_spec(FITS[i], &spec);
        moegen_variant variant;
        moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
        assert_int_equal(variant.cpu.gemm, MOEGEN_CPU_GEMM_AMX);
        moegen_error err;
        assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_OK);
        moegen_generated gen;
        if (moegen_generate(&spec, &variant, NULL, &gen, &err) != MOEGEN_OK) fail_msg("%s", err.message);
        assert_non_null(strstr(gen.files[gen.main_file].text, "_tile_dpbf16ps"));
        compile_strictly(&gen, flags, FITS[i]);
        compile_strictly(&gen, isa_flags(16), FITS[i]);
        moegen_generated_free(&gen);
        moegen_spec_free(&spec);
    }
    /* A k that is not a multiple of 32: not the default, and refused when asked for. */
    moegen_spec spec;
    parse_spec("name: amx_misfit\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 48\n"
               "moe_intermediate_size: 64\ndtype: bf16\n",
               &spec);
    moegen_variant variant;
    moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
    assert_int_equal(variant.cpu.gemm, MOEGEN_CPU_GEMM_FMA);
    moegen_error err;
    assert_int_equal(moegen_variant_apply_overrides(&variant, "gemm=amx", &err), MOEGEN_OK);
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "multiples of 32"));
    moegen_spec_free(&spec);
    /* Not for fp32 layers. */
    parse_spec("name: amx_fp32\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\n"
               "moe_intermediate_size: 64\ndtype: fp32\n",
               &spec);
    moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
    assert_int_equal(variant.cpu.gemm, MOEGEN_CPU_GEMM_FMA);
    assert_int_equal(moegen_variant_apply_overrides(&variant, "gemm=amx", &err), MOEGEN_OK);
    assert_int_equal(moegen_variant_check(&spec, &variant, &err), MOEGEN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "needs a bf16 layer"));
    moegen_spec_free(&spec);
}

/* The outer-product kernels (gemm=outer): compiled without warnings at every vector width,
 * gated and not, with shared experts and the residual MLP; refused for other dtypes and for
 * tiles that do not fit the register file or the blocking. */
static void outer_variant_compiles_without_warnings_and_refuses_what_it_cannot_run(void **state) {
    (void)state;
    static const struct {
        const char *yaml, *variant;
        int width;
    } FITS[] = {
        {"name: outer_gated\nnum_experts: 5\nnum_experts_per_tok: 3\nhidden_size: 96\nmoe_intermediate_size: 64\n"
         "dtype: fp32\nexpert_bias: true\nshared_experts: {count: 2, intermediate_size: 48, gate: true}\n",
         "gemm=outer,tile_cols=6,tile_rows=4,block_rows=128,block_cols=96", 16},
        {"name: outer_residual\nsemantics: deepspeed\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 48\n"
         "moe_intermediate_size: 80\ndtype: fp32\nactivation: gelu\nuse_residual: true\n",
         "gemm=outer,tile_cols=5,tile_rows=2,block_rows=32,block_cols=5", 16},
        {"name: outer_avx2\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 32\n"
         "dtype: fp32\n",
         "gemm=outer,vector_floats=8,tile_cols=4,tile_rows=2,block_rows=16,block_cols=8", 8},
        {"name: outer_plain\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\nmoe_intermediate_size: 32\n"
         "dtype: fp32\nactivation: relu\n",
         "gemm=outer,vector_floats=4,tile_cols=3,tile_rows=3,block_rows=24,block_cols=9", 4},
    };
    for (size_t i = 0; i < sizeof FITS / sizeof FITS[0]; i++) {
        moegen_spec spec;
        parse_spec(FITS[i].yaml, &spec);
        const moegen_target target = {.cpu_vector_floats = FITS[i].width};
        moegen_variant variant;
        moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
        moegen_error err;
        assert_int_equal(moegen_variant_apply_overrides(&variant, FITS[i].variant, &err), MOEGEN_OK);
        if (moegen_variant_check(&spec, &variant, &err) != MOEGEN_OK) fail_msg("%s: %s", FITS[i].variant, err.message);
        moegen_generated gen;
        if (moegen_generate(&spec, &variant, NULL, &gen, &err) != MOEGEN_OK) fail_msg("%s", err.message);
        assert_non_null(strstr(gen.files[gen.main_file].text, "_run_outer("));
        compile_strictly(&gen, isa_flags(FITS[i].width), FITS[i].yaml);
        moegen_generated_free(&gen);
        moegen_spec_free(&spec);
    }
    static const struct {
        const char *yaml, *variant, *message;
    } REFUSED[] = {
        {"dtype: bf16\n", "gemm=outer", "needs an fp32 layer"},
        {"dtype: fp32\n", "gemm=outer,tile_cols=8,tile_rows=4,block_rows=64", "needs 37 vector registers"},
        {"dtype: fp32\n", "gemm=outer,tile_cols=4,tile_rows=4,block_rows=96", "multiple of tile_rows x vector_floats"},
        {"dtype: fp32\n", "gemm=outer,tile_cols=18,tile_rows=1,block_rows=16,block_cols=18", "1..16"},
        {"dtype: fp32\n", "gemm=outer,tile_cols=5,tile_rows=2,block_rows=32,block_cols=5", "even"},
        {"dtype: fp32\nactivation: relu\n", "gemm=outer,tile_cols=5,tile_rows=2,block_rows=32,block_cols=5", NULL},
    };
    for (size_t i = 0; i < sizeof REFUSED / sizeof REFUSED[0]; i++) {
        char yaml[512];
        snprintf(yaml, sizeof yaml, "name: outer_refused\nnum_experts: 4\nnum_experts_per_tok: 2\nhidden_size: 64\n"
                 "moe_intermediate_size: 32\n%s", REFUSED[i].yaml);
        moegen_spec spec;
        parse_spec(yaml, &spec);
        const moegen_target target = {.cpu_vector_floats = 16};
        moegen_variant variant;
        moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
        moegen_error err;
        assert_int_equal(moegen_variant_apply_overrides(&variant, REFUSED[i].variant, &err), MOEGEN_OK);
        const moegen_status st = moegen_variant_check(&spec, &variant, &err);
        if (REFUSED[i].message) { /* refused, saying why */
            assert_int_equal(st, MOEGEN_ERR_INVALID_ARGUMENT);
            if (!strstr(err.message, REFUSED[i].message))
                fail_msg("%s: '%s' does not say '%s'", REFUSED[i].variant, err.message, REFUSED[i].message);
        } else { /* the control: the same tile without a gated activation is fine */
            assert_int_equal(st, MOEGEN_OK);
        }
        moegen_spec_free(&spec);
    }
}

/* The vdpbf16ps kernels compile without warnings, for every row count of a tile. */
static void bf16_dot_variant_compiles_without_warnings(void **state) {
    (void)state;
    moegen_spec spec;
    char path[1024];
    snprintf(path, sizeof path, "%s/specs/demo.yaml", source_dir());
    load_spec(path, &spec);
    moegen_target target = {.cpu_vector_floats = 16, .cpu_bf16_dot = 1};
    moegen_variant variant;
    moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, &target, &variant);
    assert_int_equal(variant.cpu.gemm, MOEGEN_CPU_GEMM_BF16_DOT);
    moegen_error err;
    assert_int_equal(moegen_variant_apply_overrides(&variant, "tile_rows=6,block_rows=36", &err), MOEGEN_OK);
    moegen_generated gen;
    if (moegen_generate(&spec, &variant, NULL, &gen, &err) != MOEGEN_OK) fail_msg("%s", err.message);
    const moegen_generated_file *main_file = &gen.files[gen.main_file];
    assert_non_null(strstr(main_file->text, "_mm512_dpbf16_ps"));
    assert_non_null(strstr(main_file->text, "dot_tile_u16_u16_k256_r5("));
    compile_strictly(&gen, isa_flags(16), "demo, gemm=bfdot");
    moegen_generated_free(&gen);
    moegen_spec_free(&spec);
}

static void template_errors_surface_with_the_template_line(void **state) {
    (void)state;
    /* The built-in set with layer.c.tpl replaced by a broken one. */
    const moegen_template_set *builtin = moegen_builtin_templates();
    moegen_template_file *files = calloc(builtin->count, sizeof *files);
    for (size_t i = 0; i < builtin->count; i++) {
        files[i] = builtin->files[i];
        if (!strcmp(files[i].path, "templates/cpu/layer.c.tpl")) {
            files[i].text = "/* line 1 */\n% local x = spec.no_such_field + 1\n";
            files[i].len = strlen(files[i].text);
        }
    }
    moegen_template_set set = {files, builtin->count};
    moegen_spec spec;
    parse_spec("name: t\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 32\nmoe_intermediate_size: 16\n", &spec);
    moegen_variant variant;
    moegen_variant_default(&spec, MOEGEN_BACKEND_CPU, NULL, &variant);
    moegen_generated gen;
    moegen_error err;
    assert_int_equal(moegen_generate(&spec, &variant, &set, &gen, &err), MOEGEN_ERR_TEMPLATE);
    assert_non_null(strstr(err.message, "templates/cpu/layer.c.tpl:2:"));
    free(files);
    moegen_spec_free(&spec);
}

static void compiler_errors_are_traced_back_to_the_template_line(void **state) {
    (void)state;
    moegen_spec spec;
    parse_spec("name: trace\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 32\nmoe_intermediate_size: 16\n", &spec);
    moegen_generated gen;
    generate(&spec, &gen);
    const moegen_generated_file *main_file = &gen.files[gen.main_file];
    /* every output line has an origin */
    size_t lines = 0;
    for (size_t i = 0; i < main_file->len; i++) lines += main_file->text[i] == '\n';
    assert_int_equal(main_file->n_origins, lines);
    /* the first line of the file is the header partial's first line */
    moegen_error err;
    moegen_error_set(&err, MOEGEN_ERR_COMPILE, 0, "%s:1:3: error: something", main_file->name);
    moegen_generated_annotate(&gen, &err);
    assert_non_null(strstr(err.message, "comes from templates/common/header.tpl:1"));
    /* an NVRTC-style location, deep in the file, lands in a stage template */
    const long deep = (long)lines - 2;
    moegen_error_set(&err, MOEGEN_ERR_COMPILE, 0, "%s(%ld): error: x", main_file->name, deep);
    moegen_generated_annotate(&gen, &err);
    assert_non_null(strstr(err.message, "comes from templates/cpu/"));
    moegen_generated_free(&gen);
    moegen_spec_free(&spec);
}

static void write_skips_unchanged_files(void **state) {
    (void)state;
    moegen_spec spec;
    parse_spec("name: w\nnum_experts: 4\nnum_experts_per_tok: 1\nhidden_size: 32\nmoe_intermediate_size: 16\n", &spec);
    moegen_generated gen;
    generate(&spec, &gen);
    char dir[] = "/tmp/moegen-write-XXXXXX";
    assert_non_null(mkdtemp(dir));
    moegen_error err;
    int written = -1;
    assert_int_equal(moegen_generated_write(&gen, dir, &written, &err), MOEGEN_OK);
    assert_int_equal(written, gen.n_files);
    assert_int_equal(moegen_generated_write(&gen, dir, &written, &err), MOEGEN_OK);
    assert_int_equal(written, 0);
    char cleanup[256];
    snprintf(cleanup, sizeof cleanup, "rm -rf %s", dir);
    assert_int_equal(system(cleanup), 0);
    moegen_generated_free(&gen);
    moegen_spec_free(&spec);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(generated_sources_match_the_golden_files),
        cmocka_unit_test(generation_is_byte_identical_across_processes),
        cmocka_unit_test(reordered_and_recommented_specs_generate_identical_code),
        cmocka_unit_test(free_text_never_reaches_generated_code),
        cmocka_unit_test(every_shipped_spec_compiles_without_warnings),
        cmocka_unit_test(small_spec_matrix_compiles_without_warnings),
        cmocka_unit_test(variant_check_rejects_tiles_that_do_not_fit),
        cmocka_unit_test(variant_overrides_set_named_fields_and_refuse_bad_items),
        cmocka_unit_test(bf16_dot_variant_compiles_without_warnings),
        cmocka_unit_test(amx_variant_is_chosen_where_it_fits_and_compiles_without_warnings),
        cmocka_unit_test(outer_variant_compiles_without_warnings_and_refuses_what_it_cannot_run),
        cmocka_unit_test(template_errors_surface_with_the_template_line),
        cmocka_unit_test(compiler_errors_are_traced_back_to_the_template_line),
        cmocka_unit_test(write_skips_unchanged_files),
    };
    return cmocka_run_group_tests_name("generator", tests, NULL, NULL);
}
