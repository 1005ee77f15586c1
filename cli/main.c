/* main.c — the `moegen` command: check, gen, run.
 *
 * Place in the pipeline: the command sits on top of everything:
 *   moegen check SPEC        spec -> validated spec, canonical form and hash
 *   moegen gen SPEC -o DIR   spec -> generated sources written to DIR
 *   moegen run SPEC ...      spec -> compile -> load -> run -> verify (cli/run.c)
 * Every failure prints "moegen: <message>" to stderr (one such line per error when a spec
 * has several) and exits non-zero; a valid spec's warnings print as "moegen: warning: ...".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cuda_backend.h"
#include "emit.h"
#include "data_dir.h"
#include "host_cc.h"
#include "moegen.h"
#include "spec.h"
#include "variant.h"

static const char usage_main[] =
    "usage: moegen <command> [options]\n"
    "\n"
    "moegen generates a fully specialized MoE layer forward from a YAML spec.\n"
    "\n"
    "commands:\n"
    "  check SPEC            validate SPEC; print its canonical form and hash\n"
    "  gen SPEC -o DIR       write the generated sources for SPEC into DIR\n"
    "  run SPEC [options]    compile, run on random (or loaded) tensors, verify\n"
    "                        against the reference and report speed\n"
    "  bench SPEC --tokens N,N,...  time several token counts (no verification)\n"
    "  tune SPEC [options]   sweep kernel variants, verify and time each, and write the\n"
    "                        winners per token count into a tuning database\n"
    "  import-hf CONFIG      write a spec from a Hugging Face config.json\n"
    "\n"
    "`moegen <command> --help` describes each command. Specs: specs/README.md.\n";

static const char usage_check[] =
    "usage: moegen check SPEC\n"
    "\n"
    "Validate SPEC. On success print its canonical form (every resolved field, fixed\n"
    "order; comments and key order do not matter) and its SHA-256, and exit 0. A valid\n"
    "spec that is probably not what was meant also gets warnings on stderr, one a line:\n"
    "  moegen: warning: file:line:col: message\n"
    "On failure print every error to stderr, one a line (the first error found first,\n"
    "the others in file order, then a count such as `moegen: 3 errors`), and exit 1:\n"
    "  moegen: file:line:col: message\n"
    "specs/README.md, \"Errors and warnings\", lists what is checked.\n";

static const char usage_gen[] =
    "usage: moegen gen SPEC -o DIR [--backend cpu|cuda] [--target T] [--arch sm_XX]\n"
    "                  [--variant LIST] [--templates DIR] [--expect-prefix moe_NAME]\n"
    "\n"
    "Write the generated sources for SPEC into DIR (created if missing). Files whose content\n"
    "is unchanged are not rewritten. Names are stable: they come from the layer's name, not\n"
    "from the spec's hash, so a build can name them before they exist.\n"
    "  cpu:  moe_<name>.c, moe_<name>.h, moegen_kernel_abi.h and moe_<name>.flags, the compile\n"
    "        flags the runtime itself uses for this target (one line, for `cc @file`):\n"
    "          cc @DIR/moe_<name>.flags -c DIR/moe_<name>.c      (link with -fopenmp -lm)\n"
    "  cuda: moe_<name>.cu and moegen_cuda_abi.h (kernels for NVRTC or nvcc)\n"
    "The header pins its source: an object from another generation does not link with code\n"
    "compiled against it. CMake users: moegen_generate() (README: \"Generate and link\").\n"
    "\n"
    "options:\n"
    "  -o, --output DIR      output directory (required)\n"
    "  --backend B           cpu (C + OpenMP, default) or cuda (CUDA C++ for NVRTC / nvcc)\n"
    "  --target T            cpu: the instruction sets the code is generated and compiled for:\n"
    "                        native (default: this CPU, the variant `moegen run` uses here),\n"
    "                        base, avx2, avx512, avx512-bf16, avx512-amx\n"
    "  --vector-floats N     cpu: older spelling of --target: 4 base, 8 avx2, 16 avx512\n"
    "  --arch sm_XX          cuda: target architecture the tiles are chosen for (default sm_80):\n"
    "                        sm_70 .. sm_120, optionally with the suffix a or f (sm_90a, sm_100a,\n"
    "                        sm_120f); the CUDA backend needs sm_80 or newer\n"
    "  --variant LIST        kernel variant overrides, e.g. tile_rows=6,gemm=bfdot (README:\n"
    "                        \"Kernel variants\")\n"
    "  --templates DIR       generate from the templates in DIR (laid out like the source tree's\n"
    "                        templates/; an installation's copy: <prefix>/share/moegen/templates)\n"
    "                        instead of the built-in ones; default: $MOEGEN_TEMPLATE_DIR if set\n"
    "  --expect-prefix P     fail unless the files are named P (build systems that derived the\n"
    "                        names from the spec before generating: moegen_generate)\n";

/* Each line of `text` on stderr as "moegen: <prefix><line>". */
static void print_lines(const char *prefix, const char *text) {
    for (const char *line = text; *line;) {
        const size_t length = strcspn(line, "\n");
        fprintf(stderr, "moegen: %s%.*s\n", prefix, (int)length, line);
        line += length + (line[length] == '\n');
    }
}

int moegen_cli_error(const char *fmt, ...) {
    char message[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    print_lines("", message); /* a spec's several errors: one "moegen: file:line:col: ..." line each */
    return 1;
}

void moegen_cli_warnings(const moegen_spec *spec) { print_lines("warning: ", spec->warnings); }

int moegen_cli_wants_help(int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return 1;
    return 0;
}

static int command_check(int argc, char **argv) {
    if (moegen_cli_wants_help(argc, argv)) {
        fputs(usage_check, stdout);
        return 0;
    }
    if (argc != 1) return moegen_cli_error("check: expected one SPEC argument (see moegen check --help)");
    moegen_spec spec;
    moegen_error err;
    if (moegen_spec_load_file(argv[0], &spec, &err) != MOEGEN_OK) return moegen_cli_error("%s", err.message);
    moegen_cli_warnings(&spec);
    char *canonical = moegen_spec_canonical(&spec);
    char hash[65];
    moegen_spec_hash(&spec, hash);
    int rc = 0;
    if (!canonical) {
        rc = moegen_cli_error("out of memory");
    } else {
        fputs(canonical, stdout);
        printf("# sha256: %s\n", hash);
    }
    free(canonical);
    moegen_spec_free(&spec);
    return rc;
}

/* Add DIR/<prefix>.flags (the compile flags of `target`, one line) to the files to write. */
static int add_flags_file(moegen_generated *generated, const moegen_target *target) {
    if (generated->n_files >= MOEGEN_MAX_GENERATED_FILES) return moegen_cli_error("gen: too many files");
    char flags[256];
    if (moegen_host_target_compile_flags(target, flags, sizeof flags) != 0)
        return moegen_cli_error("gen: compile flags do not fit");
    moegen_generated_file *f = &generated->files[generated->n_files];
    memset(f, 0, sizeof *f);
    const size_t len = strlen(flags) + 1;
    f->text = malloc(len + 1);
    if (!f->text) return moegen_cli_error("out of memory");
    snprintf(f->text, len + 1, "%s\n", flags);
    f->len = len;
    snprintf(f->name, sizeof f->name, "%s.flags", generated->symbol_prefix);
    generated->n_files++;
    return 0;
}

static int command_gen(int argc, char **argv) {
    if (moegen_cli_wants_help(argc, argv)) {
        fputs(usage_gen, stdout);
        return 0;
    }
    const char *spec_path = NULL, *out_dir = NULL, *arch = "sm_80", *variant_overrides = NULL;
    const char *expect_prefix = NULL, *templates_option = NULL;
    moegen_error err;
    moegen_backend backend = MOEGEN_BACKEND_CPU;
    moegen_target target;
    moegen_host_cpu_target(&target); /* native: what `moegen run` compiles for on this machine */
    int native = 1;
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "-o") || !strcmp(argv[i], "--output")) && i + 1 < argc) {
            out_dir = argv[++i];
        } else if (!strcmp(argv[i], "--vector-floats") && i + 1 < argc) {
            long long width;
            if (moegen_cli_parse_int(argv[++i], "--vector-floats", 4, 16, &width) != 0) return 1;
            if (width != 4 && width != 8 && width != 16)
                return moegen_cli_error("gen: --vector-floats must be 4, 8 or 16");
            target = (moegen_target){.cpu_vector_floats = (int)width};
            native = 0;
        } else if (!strcmp(argv[i], "--target") && i + 1 < argc) {
            const char *name = argv[++i];
            if (strcmp(name, "native") != 0 && moegen_host_target_parse(name, &target) == 0) native = 0;
            else if (strcmp(name, "native") != 0)
                return moegen_cli_error("gen: --target must be native, base, avx2, avx512, avx512-bf16 or "
                                        "avx512-amx (got '%s')",
                                        name);
        } else if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
            const char *name = argv[++i];
            if (!strcmp(name, "cpu")) backend = MOEGEN_BACKEND_CPU;
            else if (!strcmp(name, "cuda")) backend = MOEGEN_BACKEND_CUDA;
            else return moegen_cli_error("gen: --backend must be cpu or cuda (got '%s')", name);
        } else if (!strcmp(argv[i], "--variant") && i + 1 < argc) {
            variant_overrides = argv[++i];
        } else if (!strcmp(argv[i], "--templates") && i + 1 < argc) {
            templates_option = argv[++i];
        } else if (!strcmp(argv[i], "--expect-prefix") && i + 1 < argc) {
            expect_prefix = argv[++i];
        } else if (!strcmp(argv[i], "--arch") && i + 1 < argc) {
            arch = argv[++i]; /* checked here for an early message; used by moegen_cuda_generate */
            if (moegen_cuda_arch_parse(arch, NULL, &err) != MOEGEN_OK)
                return moegen_cli_error("gen: --arch: %s", err.message);
        } else if (argv[i][0] == '-') {
            return moegen_cli_error("gen: unknown option %s (see moegen gen --help)", argv[i]);
        } else if (!spec_path) {
            spec_path = argv[i];
        } else {
            return moegen_cli_error("gen: unexpected argument %s", argv[i]);
        }
    }
    if (!spec_path || !out_dir) return moegen_cli_error("gen: usage: moegen gen SPEC -o DIR");
    char template_dir[1024];
    moegen_template_set *templates = NULL;
    if (moegen_template_dir(templates_option, template_dir, sizeof template_dir, &err) != MOEGEN_OK ||
        (template_dir[0] && moegen_template_set_load(template_dir, &templates, &err) != MOEGEN_OK))
        return moegen_cli_error("gen: %s", err.message);
    moegen_spec spec;
    if (moegen_spec_load_file(spec_path, &spec, &err) != MOEGEN_OK) {
        moegen_template_set_free(templates);
        return moegen_cli_error("%s", err.message);
    }
    moegen_cli_warnings(&spec);
    moegen_generated generated;
    moegen_status st;
    if (backend == MOEGEN_BACKEND_CUDA) { /* exactly what the CUDA backend compiles for `arch` */
        st = moegen_cuda_generate(&spec, arch, variant_overrides, templates, &generated, &err);
    } else {
        moegen_variant variant;
        moegen_variant_default(&spec, backend, &target, &variant);
        st = moegen_variant_apply_overrides(&variant, variant_overrides, &err);
        if (st == MOEGEN_OK) st = moegen_generate(&spec, &variant, templates, &generated, &err);
    }
    int rc = 0;
    if (st != MOEGEN_OK) {
        rc = moegen_cli_error("%s", err.message);
    } else if (expect_prefix && strcmp(expect_prefix, generated.symbol_prefix) != 0) {
        rc = moegen_cli_error("gen: %s: the layer's name gives the files and symbols %s, but the build expects %s "
                              "(moegen_generate reads `name:` from the spec before generating; give it NAME if "
                              "the name is written in a way it cannot read)",
                              spec_path, generated.symbol_prefix, expect_prefix);
        moegen_generated_free(&generated);
    } else {
        int written = 0;
        if (backend == MOEGEN_BACKEND_CPU && add_flags_file(&generated, &target) != 0) rc = 1;
        else if (moegen_generated_write(&generated, out_dir, &written, &err) != MOEGEN_OK) {
            rc = moegen_cli_error("%s", err.message);
        } else {
            for (int i = 0; i < generated.n_files; i++)
                printf("%s/%s\n", out_dir, generated.files[i].name);
            printf("# %d of %d files written (the others were unchanged); variant %s", written, generated.n_files,
                   generated.variant_name);
            if (backend == MOEGEN_BACKEND_CPU)
                printf("; target %s%s", moegen_host_target_name(&target), native ? " (this CPU)" : "");
            printf("; build %s%s%s\n", generated.build_id, templates ? "; templates " : "",
                   templates ? template_dir : "");
            if (spec.ep_size > 1 && backend == MOEGEN_BACKEND_CPU)
                printf("# ep_size %d: every rank runs this module on its own tokens; rank r binds experts "
                       "[%d r, %d (r + 1)) and _route / _experts / _combine are the stages the runtime's "
                       "expert-parallel layer drives (moegen_layer_open with a communicator); _forward alone "
                       "is the single-rank layer\n",
                       spec.ep_size, spec.num_experts / spec.ep_size, spec.num_experts / spec.ep_size);
            else if (spec.ep_size > 1)
                printf("# ep_size %d: every rank runs these kernels on its own tokens; rank r binds experts "
                       "[%d r, %d (r + 1)); the runtime's expert-parallel layer launches them in stages and "
                       "moves rows between ranks through host memory (_ep_pack gathers the rows to send)\n",
                       spec.ep_size, spec.num_experts / spec.ep_size, spec.num_experts / spec.ep_size);
        }
        moegen_generated_free(&generated);
    }
    moegen_spec_free(&spec);
    moegen_template_set_free(templates);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(usage_main, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("moegen %s\n", MOEGEN_VERSION);
        return 0;
    }
    if (!strcmp(argv[1], "check")) return command_check(argc - 2, argv + 2);
    if (!strcmp(argv[1], "gen")) return command_gen(argc - 2, argv + 2);
    if (!strcmp(argv[1], "run")) return moegen_cli_run(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench")) return moegen_cli_bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "tune")) return moegen_cli_tune(argc - 2, argv + 2);
    if (!strcmp(argv[1], "import-hf")) return moegen_cli_import_hf(argc - 2, argv + 2);
    return moegen_cli_error("unknown command '%s' (commands: check, gen, run, bench, tune, import-hf; see moegen --help)",
                            argv[1]);
}
