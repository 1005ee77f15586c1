/* ep.c — the expert-parallel layer: one rank's share of a layer with ep_size > 1 (see ep.h
 * for the flow and its invariants). Everything that crosses ranks lives in host buffers
 * the backend allocates; the backend moves rows between those and its own memory. */
#include "ep.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct moegen_ep {
    moegen_comm *comm;           /* borrowed */
    moegen_ep_backend backend;   /* its self is borrowed */
    int rank, ranks, n_experts, n_local, first_expert;
    int64_t hidden, ffn, ffn_rows;
    size_t row_bytes;            /* one token row in the layer dtype */
    size_t elem;                 /* bytes of one element of the layer dtype */
    int weight_on_input;
    /* per-rank and per-expert bookkeeping, sized once at open (host) */
    int64_t *send_counts_by_expert; /* [E]: kept rows per expert (this rank's routes) */
    int64_t *recv_counts_by_expert; /* [P][E/P]: rows from source s for local expert l */
    int64_t *expert_offset;      /* [E + 1]: the route stage's permutation */
    int64_t *send_counts, *send_offsets, *recv_counts, *recv_offsets; /* [P] rows */
    int64_t *local_offset;       /* [E/P + 1]: local expert rows, expert by expert */
    /* host buffers (from the backend) that grow with the rows of a call */
    void *send_rows;             /* [rows out][H] dtype: the kept rows, destination by destination */
    float *send_scales;          /* [rows out] weight_on_input scales */
    float *returned;             /* [rows out][H] fp32: their experts' outputs, back */
    void *recv_rows;             /* [rows in][H] dtype: as received (source by source) */
    float *recv_scales;          /* [rows in] */
    void *expert_rows;           /* [rows in][H] dtype: expert by expert */
    float *expert_scales;        /* [rows in] */
    float *expert_out;           /* [rows in][H] fp32: expert by expert */
    float *back_rows;            /* [rows in][H] fp32: in the received order, to send back */
    size_t send_capacity, recv_capacity; /* rows */
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- open: every rank must have the same layer ---------------------------------------- */

typedef struct rank_record {
    char spec_hash[64];
    int32_t ep_size, comm_size, rank, pad;
} rank_record;

/* Compare the ranks' records; on a mismatch, name the odd rank(s) in `why`. Returns 0 when
 * every rank agrees. The "odd" ranks are those whose hash differs from the one most ranks
 * have (with ties, from rank 0's). */
static int find_odd_ranks(const rank_record *records, int ranks, char *why, size_t size) {
    int reference = 0, best = 0;
    for (int r = 0; r < ranks; r++) {
        int same = 0;
        for (int q = 0; q < ranks; q++) same += memcmp(records[r].spec_hash, records[q].spec_hash, 64) == 0;
        if (same > best) best = same, reference = r;
    }
    size_t used = 0;
    int odd = 0;
    why[0] = '\0';
    for (int r = 0; r < ranks; r++) {
        const rank_record *rec = &records[r];
        const char *problem = NULL;
        char detail[160];
        if (memcmp(rec->spec_hash, records[reference].spec_hash, 64) != 0) {
            snprintf(detail, sizeof detail, "spec sha256:%.16s... where %d rank(s) have sha256:%.16s...",
                     rec->spec_hash, best, records[reference].spec_hash);
            problem = detail;
        } else if (rec->ep_size != rec->comm_size) {
            snprintf(detail, sizeof detail, "ep_size %d on a communicator of %d ranks", (int)rec->ep_size,
                     (int)rec->comm_size);
            problem = detail;
        } else if (rec->rank != r) {
            snprintf(detail, sizeof detail, "reports rank %d", (int)rec->rank);
            problem = detail;
        }
        if (!problem) continue;
        odd++;
        int n = snprintf(why + used, size - used, "%srank %d has %s", odd > 1 ? "; " : "", r, problem);
        if (n > 0 && (size_t)n < size - used) used += (size_t)n;
    }
    return odd;
}

moegen_status moegen_ep_open(const moegen_spec *spec, const char *spec_hash, moegen_comm *comm,
                             const moegen_ep_backend *backend, moegen_ep **out, moegen_layer_desc *desc,
                             moegen_error *err) {
    *out = NULL;
    const int ranks = comm->size;
    rank_record mine;
    memset(&mine, 0, sizeof mine);
    memcpy(mine.spec_hash, spec_hash, 64);
    mine.ep_size = spec->ep_size;
    mine.comm_size = comm->size;
    mine.rank = comm->rank;
    rank_record *all = calloc((size_t)ranks, sizeof *all);
    if (!all) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    moegen_status st = moegen_comm_allgather(comm, &mine, all, sizeof mine, err);
    if (st != MOEGEN_OK) {
        free(all);
        return st;
    }
    char why[MOEGEN_ERROR_MESSAGE_BYTES - 128];
    int odd = find_odd_ranks(all, ranks, why, sizeof why);
    free(all);
    if (odd)
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "rank %d: the %d ranks do not open the same expert-parallel layer: %s", comm->rank,
                                ranks, why);
    if (spec->ep_size != ranks) /* every rank agrees, but not with the communicator */
        return moegen_error_set(err, MOEGEN_ERR_INVALID_ARGUMENT, 0,
                                "rank %d: ep_size %d needs a communicator of %d ranks (it has %d)", comm->rank,
                                spec->ep_size, spec->ep_size, ranks);

    moegen_ep *ep = calloc(1, sizeof *ep);
    if (!ep) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    ep->comm = comm;
    ep->backend = *backend;
    ep->rank = comm->rank;
    ep->ranks = ranks;
    ep->n_experts = spec->num_experts;
    ep->n_local = spec->num_experts / ranks;
    ep->first_expert = ep->rank * ep->n_local;
    ep->hidden = spec->hidden_size;
    ep->row_bytes = (size_t)spec->hidden_size * moegen_dtype_size(spec->dtype);
    ep->elem = moegen_dtype_size(spec->dtype);
    ep->ffn = spec->moe_intermediate_size;
    ep->ffn_rows = moegen_spec_ffn_rows(spec);
    ep->weight_on_input = spec->weight_on_input;
    const size_t P = (size_t)ranks, E = (size_t)spec->num_experts;
    ep->send_counts_by_expert = calloc(E, sizeof(int64_t));
    ep->recv_counts_by_expert = calloc(P * (size_t)ep->n_local, sizeof(int64_t));
    ep->expert_offset = calloc(E + 1, sizeof(int64_t));
    ep->send_counts = calloc(P, sizeof(int64_t));
    ep->send_offsets = calloc(P, sizeof(int64_t));
    ep->recv_counts = calloc(P, sizeof(int64_t));
    ep->recv_offsets = calloc(P, sizeof(int64_t));
    ep->local_offset = calloc((size_t)ep->n_local + 1, sizeof(int64_t));
    if (!ep->send_counts_by_expert || !ep->recv_counts_by_expert || !ep->expert_offset || !ep->send_counts ||
        !ep->send_offsets || !ep->recv_counts || !ep->recv_offsets || !ep->local_offset) {
        moegen_ep_close(ep);
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "out of memory");
    }
    desc->rank = ep->rank;
    desc->ep_size = ranks;
    desc->first_expert = ep->first_expert;
    desc->n_local_experts = ep->n_local;
    *out = ep;
    return MOEGEN_OK;
}

/* The host buffers of the exchange, each from the backend. */
#define EP_HOST_BUFFERS(ep)                                                                              \
    {&(ep)->send_rows, (void **)&(ep)->send_scales, (void **)&(ep)->returned, &(ep)->recv_rows,         \
     (void **)&(ep)->recv_scales, &(ep)->expert_rows, (void **)&(ep)->expert_scales,                    \
     (void **)&(ep)->expert_out, (void **)&(ep)->back_rows}

void moegen_ep_close(moegen_ep *ep) {
    if (!ep) return;
    void **host[] = EP_HOST_BUFFERS(ep);
    if (ep->comm && ep->comm->broken) {
        /* A collective that timed out may still be pending inside the transport (MPI
         * cannot cancel one), holding the buffers it was given: the count vectors live as
         * long as the communicator, and the exchange buffers are left to the transport. */
        moegen_comm_adopt(ep->comm, ep->send_counts_by_expert);
        moegen_comm_adopt(ep->comm, ep->recv_counts_by_expert);
        ep->send_counts_by_expert = ep->recv_counts_by_expert = NULL;
        const int host_is_heap = ep->backend.host_free == NULL;
        for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) {
            if (host_is_heap) moegen_comm_adopt(ep->comm, *host[i]);
            *host[i] = NULL;
        }
    }
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        if (*host[i]) {
            if (ep->backend.host_free) ep->backend.host_free(ep->backend.self, *host[i]);
            else free(*host[i]);
        }
    free(ep->send_counts_by_expert);
    free(ep->recv_counts_by_expert);
    free(ep->expert_offset);
    free(ep->send_counts);
    free(ep->send_offsets);
    free(ep->recv_counts);
    free(ep->recv_offsets);
    free(ep->local_offset);
    free(ep);
}

/* ---- forward ----------------------------------------------------------------------------- */

/* Replace `*buffer` by a host buffer of `count` items of `size` bytes (at least one; its
 * contents need not survive). */
static int grow(moegen_ep *ep, void **buffer, size_t count, size_t size) {
    const size_t bytes = (count ? count : 1) * size;
    void *fresh = ep->backend.host_alloc ? ep->backend.host_alloc(ep->backend.self, bytes) : malloc(bytes);
    if (!fresh) return -1;
    if (*buffer) {
        if (ep->backend.host_free) ep->backend.host_free(ep->backend.self, *buffer);
        else free(*buffer);
    }
    *buffer = fresh;
    return 0;
}

static moegen_status ensure_buffers(moegen_ep *ep, size_t send_rows, size_t recv_rows, moegen_error *err) {
    int failed = 0;
    const size_t out_row = (size_t)ep->hidden * sizeof(float);
    if (send_rows > ep->send_capacity || !ep->send_rows) { /* never NULL, even for 0 rows */
        failed |= grow(ep, &ep->send_rows, send_rows, ep->row_bytes);
        failed |= grow(ep, (void **)&ep->returned, send_rows, out_row);
        failed |= grow(ep, (void **)&ep->send_scales, send_rows, sizeof(float));
        if (!failed) ep->send_capacity = send_rows;
    }
    if (!failed && (recv_rows > ep->recv_capacity || !ep->recv_rows)) {
        failed |= grow(ep, &ep->recv_rows, recv_rows, ep->row_bytes);
        failed |= grow(ep, &ep->expert_rows, recv_rows, ep->row_bytes);
        failed |= grow(ep, (void **)&ep->expert_out, recv_rows, out_row);
        failed |= grow(ep, (void **)&ep->back_rows, recv_rows, out_row);
        failed |= grow(ep, (void **)&ep->recv_scales, recv_rows, sizeof(float));
        failed |= grow(ep, (void **)&ep->expert_scales, recv_rows, sizeof(float));
        if (!failed) ep->recv_capacity = recv_rows;
    }
    return failed ? moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                     "rank %d: cannot allocate the exchange buffers for %zu rows out, %zu in",
                                     ep->rank, send_rows, recv_rows)
                  : MOEGEN_OK;
}

/* Offsets of a count vector (exclusive prefix sums); returns the total. */
static int64_t prefix(const int64_t *counts, int64_t *offsets, int n) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        offsets[i] = total;
        total += counts[i];
    }
    return total;
}

/* Steps 2 and 3: exchange the counts, pack the kept rows, send them. */
static moegen_status dispatch_rows(moegen_ep *ep, const moegen_forward_io *io, int64_t *rows_in, moegen_error *err) {
    const int P = ep->ranks, L = ep->n_local;
    moegen_status st = moegen_comm_alltoall(ep->comm, ep->send_counts_by_expert, ep->recv_counts_by_expert,
                                            (size_t)L * sizeof(int64_t), err);
    if (st != MOEGEN_OK) return st;
    for (int q = 0; q < P; q++) {
        ep->send_counts[q] = ep->recv_counts[q] = 0;
        for (int l = 0; l < L; l++) {
            ep->send_counts[q] += ep->send_counts_by_expert[q * L + l];
            ep->recv_counts[q] += ep->recv_counts_by_expert[q * L + l];
        }
    }
    const int64_t rows_out = prefix(ep->send_counts, ep->send_offsets, P);
    *rows_in = prefix(ep->recv_counts, ep->recv_offsets, P);
    st = ensure_buffers(ep, (size_t)rows_out, (size_t)*rows_in, err);
    /* The kept rows of every expert in expert order, which is destination order because
     * each rank's experts are contiguous. Padding rows are never sent. */
    if (st == MOEGEN_OK && rows_out > 0)
        st = ep->backend.pack(ep->backend.self, io, ep->send_rows, ep->weight_on_input ? ep->send_scales : NULL, err);
    if (st == MOEGEN_OK)
        st = moegen_comm_alltoallv(ep->comm, ep->send_rows, ep->send_counts, ep->send_offsets, ep->recv_rows,
                                   ep->recv_counts, ep->recv_offsets, ep->row_bytes, err);
    if (st == MOEGEN_OK && ep->weight_on_input)
        st = moegen_comm_alltoallv(ep->comm, ep->send_scales, ep->send_counts, ep->send_offsets, ep->recv_scales,
                                   ep->recv_counts, ep->recv_offsets, sizeof(float), err);
    return st;
}

/* The chunk (source s, local expert l) of the received rows: where it is in the received
 * order and where it goes in the expert-by-expert order. */
static void chunk_in(const int64_t *recv_counts_by_expert, const int64_t *recv_offsets, const int64_t *local_offset,
                     int L, int s, int l, int64_t *received_at, int64_t *expert_at) {
    int64_t within_source = 0, before_in_expert = 0;
    for (int m = 0; m < l; m++) within_source += recv_counts_by_expert[s * L + m];
    for (int q = 0; q < s; q++) before_in_expert += recv_counts_by_expert[q * L + l];
    *received_at = recv_offsets[s] + within_source;
    *expert_at = local_offset[l] + before_in_expert;
}

static void chunk(const moegen_ep *ep, int s, int l, int64_t *received_at, int64_t *expert_at) {
    chunk_in(ep->recv_counts_by_expert, ep->recv_offsets, ep->local_offset, ep->n_local, s, l, received_at, expert_at);
}

/* Step 4: the received rows expert by expert (by source rank, then the source's order)
 * through the local experts; outputs back in the received order. */
static moegen_status run_local_experts(moegen_ep *ep, const moegen_kernel_weights *w, int n_threads,
                                       int64_t rows_in, moegen_error *err) {
    const int P = ep->ranks, L = ep->n_local;
    ep->local_offset[0] = 0;
    for (int l = 0; l < L; l++) {
        int64_t rows = 0;
        for (int s = 0; s < P; s++) rows += ep->recv_counts_by_expert[s * L + l];
        ep->local_offset[l + 1] = ep->local_offset[l] + rows;
    }
    if (rows_in == 0) return MOEGEN_OK;
    const size_t out_row = (size_t)ep->hidden * sizeof(float);
    for (int s = 0; s < P; s++)
        for (int l = 0; l < L; l++) {
            int64_t from, to, n = ep->recv_counts_by_expert[s * L + l];
            if (n == 0) continue;
            chunk(ep, s, l, &from, &to);
            memcpy((char *)ep->expert_rows + to * ep->row_bytes, (char *)ep->recv_rows + from * ep->row_bytes,
                   (size_t)n * ep->row_bytes);
            if (ep->weight_on_input)
                memcpy(ep->expert_scales + to, ep->recv_scales + from, (size_t)n * sizeof(float));
        }
    moegen_status st = ep->backend.experts(ep->backend.self, w, n_threads, ep->first_expert, L, ep->local_offset,
                                           ep->expert_rows, ep->weight_on_input ? ep->expert_scales : NULL,
                                           ep->expert_out, err);
    if (st != MOEGEN_OK) return st;
    for (int s = 0; s < P; s++) /* back in the received order, for the return trip */
        for (int l = 0; l < L; l++) {
            int64_t to, from, n = ep->recv_counts_by_expert[s * L + l];
            if (n == 0) continue;
            chunk(ep, s, l, &to, &from);
            memcpy((char *)ep->back_rows + to * out_row, (char *)ep->expert_out + from * out_row,
                   (size_t)n * out_row);
        }
    return MOEGEN_OK;
}

/* Step 5: the outputs back to the ranks that sent the rows, then into the rows of their
 * route stage's permutation (padding rows are never filled: they are never combined). */
static moegen_status return_outputs(moegen_ep *ep, moegen_error *err) {
    const size_t out_row = (size_t)ep->hidden * sizeof(float);
    moegen_status st = moegen_comm_alltoallv(ep->comm, ep->back_rows, ep->recv_counts, ep->recv_offsets,
                                             ep->returned, ep->send_counts, ep->send_offsets, out_row, err);
    return st == MOEGEN_OK ? ep->backend.unpack(ep->backend.self, ep->returned, err) : st;
}

moegen_status moegen_ep_forward(moegen_ep *ep, const moegen_kernel_weights *w, int n_threads,
                                const moegen_forward_io *io, moegen_forward_stats *stats, moegen_error *err) {
    const uint64_t sent_before = ep->comm->bytes_sent, received_before = ep->comm->bytes_received;
    moegen_forward_stats local;
    moegen_forward_stats *s = stats ? stats : &local;
    memset(s, 0, sizeof *s);
    double t0 = now_ms();
    moegen_status st = ep->backend.route(ep->backend.self, w, n_threads, io, ep->send_counts_by_expert,
                                         ep->expert_offset, s, err);
    double t1 = now_ms();
    int64_t rows_in = 0;
    if (st == MOEGEN_OK) st = dispatch_rows(ep, io, &rows_in, err);
    double t2 = now_ms();
    if (st == MOEGEN_OK) st = run_local_experts(ep, w, n_threads, rows_in, err);
    double t3 = now_ms();
    if (st == MOEGEN_OK) st = return_outputs(ep, err);
    double t4 = now_ms();
    if (st == MOEGEN_OK) st = ep->backend.combine(ep->backend.self, w, n_threads, io, s, err);
    double t5 = now_ms();
    for (int q = 0; q < ep->ranks; q++)
        if (q != ep->rank) {
            s->rows_sent += ep->send_counts[q];
            s->rows_received += ep->recv_counts[q];
        }
    s->bytes_sent = ep->comm->bytes_sent - sent_before;
    s->bytes_received = ep->comm->bytes_received - received_before;
    s->route_ms = t1 - t0;
    s->dispatch_ms = (t2 - t1) + (t4 - t3);
    s->experts_ms = t3 - t2;
    s->combine_ms = t5 - t4;
    return st;
}

/* ---- training ------------------------------------------------------------------------------ */

struct moegen_ep_saved {
    void *backend_saved;       /* the backend's: routing, permutation, x (route and combine state) */
    void (*backend_free)(void *saved);
    size_t (*backend_bytes)(const void *saved);
    size_t own_bytes;          /* what the copies and buffers below hold */
    int64_t n_tokens, rows_out, rows_in;
    int ranks, n_local;
    moegen_kernel_weights w;   /* the weights of the forward (the local experts' slices) */
    /* the exchange of the forward, kept: the backward retraces it */
    int64_t *send_counts, *send_offsets, *recv_counts, *recv_offsets; /* [P] */
    int64_t *recv_counts_by_expert;                                   /* [P][L] */
    int64_t *local_offset;                                            /* [L + 1] */
    void *expert_rows;                                                /* [rows in][H] dtype, expert order */
    float *expert_scales;                                             /* [rows in] (weight_on_input) */
    /* the backward's (heap; from the first backward on) */
    float *send_grad;   /* [rows out][H]: d loss / d output of the rows sent, then d loss / d input back */
    float *recv_grad;   /* [rows in][H]: as received */
    float *expert_do;   /* [rows in][H]: expert order */
    float *expert_du;   /* [rows in][H]: expert order */
    float *pre;         /* [rows in][F1] */
    void *h;            /* [rows in][F] dtype */
    int data_done;
};

static void *copy_of(const void *src, size_t bytes) {
    void *dst = malloc(bytes ? bytes : 1);
    if (dst && bytes) memcpy(dst, src, bytes);
    return dst;
}

void moegen_ep_saved_free(moegen_ep_saved *s) {
    if (!s) return;
    if (s->backend_saved && s->backend_free) s->backend_free(s->backend_saved);
    free(s->send_counts);
    free(s->send_offsets);
    free(s->recv_counts);
    free(s->recv_offsets);
    free(s->recv_counts_by_expert);
    free(s->local_offset);
    free(s->expert_rows);
    free(s->expert_scales);
    free(s->send_grad);
    free(s->recv_grad);
    free(s->expert_do);
    free(s->expert_du);
    free(s->pre);
    free(s->h);
    free(s);
}

int64_t moegen_ep_saved_tokens(const moegen_ep_saved *s) { return s ? s->n_tokens : 0; }

moegen_status moegen_ep_forward_train(moegen_ep *ep, const moegen_kernel_weights *w, int n_threads,
                                      const moegen_forward_io *io, moegen_ep_saved **saved,
                                      moegen_forward_stats *stats, moegen_error *err) {
    *saved = NULL;
    if (!ep->backend.train_begin)
        return moegen_error_set(err, MOEGEN_ERR_UNSUPPORTED, 0,
                                "rank %d: forward_train: this backend has no training backward yet", ep->rank);
    moegen_ep_saved *s = calloc(1, sizeof *s);
    if (!s) return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "rank %d: out of memory", ep->rank);
    s->backend_free = ep->backend.saved_free;
    s->backend_bytes = ep->backend.saved_bytes;
    s->n_tokens = io->n_tokens;
    s->w = *w;
    s->ranks = ep->ranks;
    s->n_local = ep->n_local;
    /* the backend's state; a rank that cannot make it still takes part in the collectives */
    moegen_status st = ep->backend.train_begin(ep->backend.self, w, n_threads, io, &s->backend_saved, err);
    moegen_status forward = moegen_ep_forward(ep, w, n_threads, io, stats, st == MOEGEN_OK ? err : NULL);
    if (st == MOEGEN_OK) {
        ep->backend.train_end(ep->backend.self, s->backend_saved);
        st = forward;
    }
    if (st == MOEGEN_OK) {
        const size_t P = (size_t)ep->ranks, L = (size_t)ep->n_local;
        s->rows_out = prefix(ep->send_counts, ep->send_offsets, ep->ranks);
        s->rows_in = ep->local_offset[ep->n_local];
        s->send_counts = copy_of(ep->send_counts, P * sizeof(int64_t));
        s->send_offsets = copy_of(ep->send_offsets, P * sizeof(int64_t));
        s->recv_counts = copy_of(ep->recv_counts, P * sizeof(int64_t));
        s->recv_offsets = copy_of(ep->recv_offsets, P * sizeof(int64_t));
        s->recv_counts_by_expert = copy_of(ep->recv_counts_by_expert, P * L * sizeof(int64_t));
        s->local_offset = copy_of(ep->local_offset, (L + 1) * sizeof(int64_t));
        s->expert_rows = copy_of(ep->expert_rows, (size_t)s->rows_in * ep->row_bytes);
        s->expert_scales = ep->weight_on_input ? copy_of(ep->expert_scales, (size_t)s->rows_in * sizeof(float))
                                               : NULL;
        s->own_bytes = sizeof *s + (4 * P + P * L + L + 1) * sizeof(int64_t) + (size_t)s->rows_in * ep->row_bytes +
                       (s->expert_scales ? (size_t)s->rows_in * sizeof(float) : 0);
        if (!s->send_counts || !s->send_offsets || !s->recv_counts || !s->recv_offsets ||
            !s->recv_counts_by_expert || !s->local_offset || !s->expert_rows ||
            (ep->weight_on_input && !s->expert_scales))
            st = moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0, "rank %d: cannot keep the exchange of %lld rows",
                                  ep->rank, (long long)s->rows_in);
    }
    if (st != MOEGEN_OK) {
        moegen_ep_saved_free(s);
        return st;
    }
    *saved = s;
    return MOEGEN_OK;
}

size_t moegen_ep_saved_bytes(const moegen_ep_saved *s) {
    if (!s) return 0;
    return s->own_bytes + (s->backend_bytes ? s->backend_bytes(s->backend_saved) : 0);
}

/* The rows of every (source s, local expert l) chunk from one order to the other: `to_expert`
 * 1 moves the received order into the expert-by-expert order, 0 the reverse. */
static void reorder_rows(const moegen_ep_saved *s, const char *from, char *to, size_t row_bytes, int to_expert) {
    for (int q = 0; q < s->ranks; q++)
        for (int l = 0; l < s->n_local; l++) {
            const int64_t n = s->recv_counts_by_expert[q * s->n_local + l];
            if (n == 0) continue;
            int64_t received_at, expert_at; /* the forward's chunk, from the saved exchange */
            chunk_in(s->recv_counts_by_expert, s->recv_offsets, s->local_offset, s->n_local, q, l, &received_at,
                     &expert_at);
            const int64_t src = to_expert ? received_at : expert_at, dst = to_expert ? expert_at : received_at;
            memcpy(to + dst * row_bytes, from + src * row_bytes, (size_t)n * row_bytes);
        }
}

/* The backward's exchange buffers (heap; the first backward allocates them). */
static moegen_status backward_buffers(const moegen_ep *ep, moegen_ep_saved *s, moegen_error *err) {
    if (s->send_grad) return MOEGEN_OK;
    const size_t H = (size_t)ep->hidden, in = (size_t)s->rows_in, out = (size_t)s->rows_out;
    s->send_grad = malloc((out ? out : 1) * H * sizeof(float));
    s->recv_grad = malloc((in ? in : 1) * H * sizeof(float));
    s->expert_do = malloc((in ? in : 1) * H * sizeof(float));
    s->expert_du = malloc((in ? in : 1) * H * sizeof(float));
    s->pre = malloc((in ? in : 1) * (size_t)ep->ffn_rows * sizeof(float));
    s->h = malloc((in ? in : 1) * (size_t)ep->ffn * ep->elem);
    if (!s->send_grad || !s->recv_grad || !s->expert_do || !s->expert_du || !s->pre || !s->h)
        return moegen_error_set(err, MOEGEN_ERR_NO_MEMORY, 0,
                                "rank %d: backward: cannot allocate the buffers of %zu rows out, %zu in", ep->rank, out,
                                in);
    s->own_bytes += (out + 3 * in) * H * sizeof(float) + in * (size_t)ep->ffn_rows * sizeof(float) +
                    in * (size_t)ep->ffn * ep->elem;
    return MOEGEN_OK;
}

/* The local experts' backward arguments over the kept rows (their weight gradients in g). */
static moegen_kernel_expert_backward_args expert_backward_args(const moegen_ep *ep, moegen_ep_saved *s,
                                                               const moegen_kernel_weights *w, int n_threads,
                                                               const moegen_grads *g) {
    return (moegen_kernel_expert_backward_args){
        .abi_version = MOEGEN_KERNEL_ABI_VERSION,
        .n_threads = n_threads,
        .first_expert = ep->first_expert,
        .n_experts = ep->n_local,
        .expert_offset = s->local_offset,
        .x = s->expert_rows,
        .row_scale = s->expert_scales,
        .w1 = w->w1,
        .b1 = w->b1,
        .w2 = w->w2,
        .d_out = s->expert_do,
        .du = s->expert_du,
        .pre = s->pre,
        .h = s->h,
        .g_w1 = g ? g->w1 : NULL,
        .g_b1 = g ? g->b1 : NULL,
        .g_w2 = g ? g->w2 : NULL,
        .g_b2 = g ? g->b2 : NULL,
        .accumulate = g ? g->accumulate : 0,
    };
}

moegen_status moegen_ep_backward(moegen_ep *ep, moegen_ep_saved *s, int n_threads, const moegen_backward_io *bio,
                                 const moegen_grads *grads, moegen_error *err) {
    const moegen_kernel_weights *w = &s->w;
    const size_t H = (size_t)ep->hidden, grad_row = H * sizeof(float);
    s->data_done = 0;
    moegen_kernel_backward_plan plan;
    /* 1. the combine's backward: d loss / d output of every kept row, and the dense FFNs */
    moegen_status st = ep->backend.backward_combine(ep->backend.self, s->backend_saved, n_threads, bio, &plan, err);
    if (st == MOEGEN_OK) st = backward_buffers(ep, s, err);
    /* 2. those rows to the ranks that ran their experts, in the order the forward sent them */
    if (st == MOEGEN_OK) {
        int64_t at = 0;
        for (int e = 0; e < ep->n_experts; e++)
            for (int64_t i = 0; i < plan.counts_after[e]; i++, at++)
                memcpy((char *)s->send_grad + (size_t)at * grad_row,
                       plan.row_do + (size_t)(plan.expert_offset[e] + i) * H, grad_row);
        st = moegen_comm_alltoallv(ep->comm, s->send_grad, s->send_counts, s->send_offsets, s->recv_grad,
                                   s->recv_counts, s->recv_offsets, grad_row, err);
    }
    /* 3. the local experts' backward over the rows they ran in the forward */
    if (st == MOEGEN_OK && s->rows_in > 0) {
        reorder_rows(s, (const char *)s->recv_grad, (char *)s->expert_do, grad_row, 1);
        moegen_kernel_expert_backward_args a = expert_backward_args(ep, s, w, n_threads, NULL);
        st = ep->backend.backward_experts(ep->backend.self, &a, 0, err);
        if (st == MOEGEN_OK) reorder_rows(s, (const char *)s->expert_du, (char *)s->recv_grad, grad_row, 0);
    }
    /* 4. d loss / d input back to the rows' ranks, into the permutation's rows */
    if (st == MOEGEN_OK)
        st = moegen_comm_alltoallv(ep->comm, s->recv_grad, s->recv_counts, s->recv_offsets, s->send_grad,
                                   s->send_counts, s->send_offsets, grad_row, err);
    if (st == MOEGEN_OK) {
        int64_t at = 0;
        for (int e = 0; e < ep->n_experts; e++)
            for (int64_t i = 0; i < plan.counts_after[e]; i++, at++)
                memcpy(plan.row_du + (size_t)(plan.expert_offset[e] + i) * H,
                       (const char *)s->send_grad + (size_t)at * grad_row, grad_row);
    }
    /* 5. the router's backward and dx */
    if (st == MOEGEN_OK) st = ep->backend.backward_route(ep->backend.self, s->backend_saved, n_threads, bio, err);
    if (st != MOEGEN_OK) return st;
    s->data_done = 1;
    return grads ? moegen_ep_backward_weights(ep, s, n_threads, grads, err) : MOEGEN_OK;
}

moegen_status moegen_ep_backward_weights(moegen_ep *ep, moegen_ep_saved *s, int n_threads, const moegen_grads *grads,
                                         moegen_error *err) {
    const moegen_kernel_weights *w = &s->w;
    if (!s->data_done)
        return moegen_error_set(err, MOEGEN_ERR_STATE, 0,
                                "rank %d: backward_weights: moegen_layer_backward has not run on this saved forward",
                                ep->rank);
    /* the local experts' gradients over the rows every rank sent them (no communication) */
    moegen_kernel_expert_backward_args a = expert_backward_args(ep, s, w, n_threads, grads);
    moegen_status st = ep->backend.backward_experts(ep->backend.self, &a, 1, err);
    if (st != MOEGEN_OK) return st;
    moegen_grads rest = *grads; /* the router, shared experts and residual: this rank's tokens */
    rest.w1 = rest.b1 = rest.w2 = rest.b2 = NULL;
    return ep->backend.backward_weights(ep->backend.self, s->backend_saved, n_threads, &rest, err);
}
