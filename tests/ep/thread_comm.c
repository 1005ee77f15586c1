/* thread_comm.c — P ranks as threads of one process (see thread_comm.h). */
#include "thread_comm.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct slot {
    const void *send;
    const int64_t *send_counts, *send_offsets;
    size_t bytes; /* alltoall / allgather: bytes per rank; alltoallv: unit bytes */
    int64_t *values; /* allreduce */
} slot;

struct thread_world {
    int ranks;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int arrived;
    unsigned long generation;
    int broken;
    slot *slots;
};

typedef struct rank_handle {
    thread_world *world;
    int rank;
} rank_handle;

thread_world *thread_world_create(int ranks) {
    thread_world *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->ranks = ranks;
    w->slots = calloc((size_t)ranks, sizeof *w->slots);
    pthread_mutex_init(&w->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->changed, &attr);
    pthread_condattr_destroy(&attr);
    return w;
}

void thread_world_destroy(thread_world *w) {
    if (!w) return;
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->changed);
    free(w->slots);
    free(w);
}

/* Wait until every rank arrives, or until the deadline (then the world is broken). */
static int barrier(thread_world *w, double timeout_s, char *why, size_t why_size) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)timeout_s;
    deadline.tv_nsec += (long)((timeout_s - (double)(time_t)timeout_s) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&w->lock);
    int rc = 0;
    if (w->broken) {
        rc = -1;
    } else if (++w->arrived == w->ranks) {
        w->arrived = 0;
        w->generation++;
        pthread_cond_broadcast(&w->changed);
    } else {
        const unsigned long mine = w->generation;
        while (w->generation == mine && !w->broken && rc == 0)
            if (pthread_cond_timedwait(&w->changed, &w->lock, &deadline) == ETIMEDOUT) rc = -2;
        if (rc == -2 || w->broken) {
            w->broken = 1;
            pthread_cond_broadcast(&w->changed);
            rc = rc ? rc : -1;
        }
    }
    pthread_mutex_unlock(&w->lock);
    if (rc == -2) snprintf(why, why_size, "a peer did not arrive within %.3g s", timeout_s);
    else if (rc) snprintf(why, why_size, "the thread world is broken (a peer timed out)");
    return rc;
}

static int alltoall(void *user, const void *send, void *recv, size_t bytes, void *stream, double timeout_s,
                    char *why, size_t why_size) {
    (void)stream;
    rank_handle *h = user;
    thread_world *w = h->world;
    w->slots[h->rank] = (slot){.send = send, .bytes = bytes};
    if (barrier(w, timeout_s, why, why_size)) return 1;
    for (int q = 0; q < w->ranks; q++)
        memcpy((char *)recv + (size_t)q * bytes, (const char *)w->slots[q].send + (size_t)h->rank * bytes, bytes);
    return barrier(w, timeout_s, why, why_size) ? 1 : 0;
}

static int alltoallv(void *user, const void *send, const int64_t *send_counts, const int64_t *send_offsets,
                     void *recv, const int64_t *recv_counts, const int64_t *recv_offsets, size_t unit,
                     void *stream, double timeout_s, char *why, size_t why_size) {
    (void)stream;
    rank_handle *h = user;
    thread_world *w = h->world;
    w->slots[h->rank] = (slot){.send = send, .send_counts = send_counts, .send_offsets = send_offsets, .bytes = unit};
    if (barrier(w, timeout_s, why, why_size)) return 1;
    for (int q = 0; q < w->ranks; q++) {
        const slot *peer = &w->slots[q];
        if (peer->send_counts[h->rank] != recv_counts[q] || peer->bytes != unit) {
            snprintf(why, why_size, "rank %d sends %lld rows of %zu bytes where %lld of %zu were expected", q,
                     (long long)peer->send_counts[h->rank], peer->bytes, (long long)recv_counts[q], unit);
            barrier(w, timeout_s, why + strlen(why), why_size - strlen(why));
            return 2;
        }
        if (recv_counts[q] > 0)
            memcpy((char *)recv + (size_t)recv_offsets[q] * unit,
                   (const char *)peer->send + (size_t)peer->send_offsets[h->rank] * unit,
                   (size_t)recv_counts[q] * unit);
    }
    return barrier(w, timeout_s, why, why_size) ? 1 : 0;
}

static int allreduce_max(void *user, int64_t *values, int n, double timeout_s, char *why, size_t why_size) {
    rank_handle *h = user;
    thread_world *w = h->world;
    int64_t *mine = malloc((size_t)(n > 0 ? n : 1) * sizeof *mine);
    if (!mine) return 3;
    memcpy(mine, values, (size_t)n * sizeof *mine);
    w->slots[h->rank] = (slot){.values = mine};
    int rc = barrier(w, timeout_s, why, why_size) ? 1 : 0;
    for (int q = 0; rc == 0 && q < w->ranks; q++)
        for (int i = 0; i < n; i++)
            if (w->slots[q].values[i] > values[i]) values[i] = w->slots[q].values[i];
    if (rc == 0) rc = barrier(w, timeout_s, why, why_size) ? 1 : 0;
    free(mine);
    return rc;
}

static int allgather(void *user, const void *send, void *recv, size_t bytes, double timeout_s, char *why,
                     size_t why_size) {
    rank_handle *h = user;
    thread_world *w = h->world;
    w->slots[h->rank] = (slot){.send = send, .bytes = bytes};
    if (barrier(w, timeout_s, why, why_size)) return 1;
    for (int q = 0; q < w->ranks; q++) memcpy((char *)recv + (size_t)q * bytes, w->slots[q].send, bytes);
    return barrier(w, timeout_s, why, why_size) ? 1 : 0;
}

static void destroy(void *user) { free(user); }

moegen_comm *thread_world_comm(thread_world *world, int rank) {
    rank_handle *h = malloc(sizeof *h);
    if (!h) return NULL;
    h->world = world;
    h->rank = rank;
    const moegen_comm_callbacks callbacks = {alltoall, alltoallv, allreduce_max, allgather, destroy};
    moegen_comm *comm = NULL;
    if (moegen_comm_create(rank, world->ranks, &callbacks, h, &comm, NULL) != MOEGEN_OK) {
        free(h);
        return NULL;
    }
    return comm;
}
