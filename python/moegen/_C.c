/* _C.c — the CPython extension over libmoegen's C API (include/moegen/moegen.h).
 *
 * Place in the pipeline: Python (moegen/layer.py, moegen/torch.py) -> [this module] ->
 * libmoegen. It is a thin layer: tensors arrive as raw data pointers (ints) that the Python
 * side has checked (dtype, device, shape, contiguity, naming the tensor on error); every
 * status becomes a moegen.Error with the status name and the library's message. The GIL is
 * released while the library works (open compiles; forward and backward run for long).
 *
 * Objects: a layer is a capsule "moegen.layer" (closed when collected); a saved training
 * forward is a capsule "moegen.saved" that holds a reference to its layer's capsule, so the
 * layer outlives it, and is freed when collected or by saved_free.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "moegen.h"

static PyObject *error_class; /* moegen.Error, set by moegen/__init__.py (set_error_class) */

/* Raise moegen.Error(status, status_name, message). Returns NULL. */
static PyObject *raise_status(moegen_status status, const moegen_error *err) {
    PyObject *cls = error_class ? error_class : PyExc_RuntimeError;
    PyObject *value = Py_BuildValue("(iss)", (int)status, moegen_status_name(status), err ? err->message : "");
    if (value) {
        PyErr_SetObject(cls, value);
        Py_DECREF(value);
    }
    return NULL;
}

static PyObject *set_error_class(PyObject *self, PyObject *cls) {
    (void)self;
    Py_XINCREF(cls);
    Py_XSETREF(error_class, cls);
    Py_RETURN_NONE;
}

/* ---- layers ---------------------------------------------------------------------------------- */

static void layer_destructor(PyObject *capsule) {
    moegen_layer *layer = PyCapsule_GetPointer(capsule, "moegen.layer");
    if (layer) moegen_layer_close(layer);
    Py_XDECREF((PyObject *)PyCapsule_GetContext(capsule)); /* its communicator, closed after it */
}

static moegen_layer *layer_of(PyObject *capsule) {
    return PyCapsule_GetPointer(capsule, "moegen.layer"); /* sets TypeError on a wrong object */
}

/* open(spec_text, display_name, device, n_threads, mode, variant, template_dir, cache_dir,
 *      activations, tuning, comm or None) -> layer */
static PyObject *py_open(PyObject *self, PyObject *args) {
    (void)self;
    const char *text, *display, *variant, *template_dir, *cache_dir;
    Py_ssize_t length;
    int device, n_threads, mode, activations, tuning;
    PyObject *comm_capsule;
    if (!PyArg_ParseTuple(args, "s#siiizzziiO", &text, &length, &display, &device, &n_threads, &mode, &variant,
                          &template_dir, &cache_dir, &activations, &tuning, &comm_capsule))
        return NULL;
    moegen_comm *comm = NULL;
    if (comm_capsule != Py_None && !(comm = PyCapsule_GetPointer(comm_capsule, "moegen.comm"))) return NULL;
    moegen_open_options o;
    moegen_open_options_init(&o);
    o.device = (moegen_device_kind)device;
    o.n_threads = n_threads;
    o.mode = mode;
    o.variant = variant;
    o.template_dir = template_dir;
    o.cache_dir = cache_dir;
    o.activations = activations;
    o.tuning = tuning;
    o.comm = comm;
    moegen_layer *layer = NULL;
    moegen_error err;
    moegen_status st;
    Py_BEGIN_ALLOW_THREADS st = moegen_layer_open_string(text, (size_t)length, display, &o, &layer, &err);
    Py_END_ALLOW_THREADS if (st != MOEGEN_OK) return raise_status(st, &err);
    PyObject *capsule = PyCapsule_New(layer, "moegen.layer", layer_destructor);
    if (!capsule) {
        moegen_layer_close(layer);
        return NULL;
    }
    if (comm_capsule != Py_None) { /* the communicator outlives the layer */
        Py_INCREF(comm_capsule);
        PyCapsule_SetContext(capsule, comm_capsule);
    }
    return capsule;
}

static PyObject *py_describe(PyObject *self, PyObject *capsule) {
    (void)self;
    moegen_layer *layer = layer_of(capsule);
    if (!layer) return NULL;
    moegen_layer_desc d;
    moegen_status st = moegen_layer_describe(layer, &d);
    if (st != MOEGEN_OK) return raise_status(st, NULL);
    static const char *const dtypes[] = {"fp32", "fp16", "bf16"};
    return Py_BuildValue(
        "{s:i,s:i,s:L,s:L,s:L,s:s,s:i,s:L,s:L,s:s,s:s,s:s,s:s,s:i,s:s,s:s,s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:d}",
        "num_experts", d.num_experts, "top_k", d.top_k, "hidden_size", (long long)d.hidden_size, "ffn_size",
        (long long)d.ffn_size, "ffn_rows", (long long)d.ffn_rows, "dtype",
        d.dtype >= 0 && d.dtype <= 2 ? dtypes[d.dtype] : "?", "n_shared", d.n_shared, "shared_ffn_size",
        (long long)d.shared_ffn_size, "shared_ffn_rows", (long long)d.shared_ffn_rows, "device",
        d.device == MOEGEN_DEVICE_CUDA ? "cuda" : "cpu", "spec_hash", d.spec_hash, "variant", d.variant,
        "kernel_path", d.kernel_path, "n_variants", d.n_variants, "tuning", d.tuning, "templates", d.templates,
        "weights", d.weights, "cache_hit", d.cache_hit, "n_threads", d.n_threads, "rank", d.rank, "ep_size",
        d.ep_size, "first_expert", d.first_expert, "n_local_experts", d.n_local_experts, "compile_ms", d.compile_ms);
}

/* A pointer from a dict entry (an int; absent or None: NULL). Returns -1 with an exception. */
static int pointer_item(PyObject *dict, const char *key, const void **out) {
    *out = NULL;
    if (!dict || dict == Py_None) return 0;
    PyObject *value = PyDict_GetItemString(dict, key); /* borrowed */
    if (!value || value == Py_None) return 0;
    void *p = PyLong_AsVoidPtr(value);
    if (!p && PyErr_Occurred()) return -1;
    *out = p;
    return 0;
}

#define WEIGHT_FIELDS(X)                                                                                              \
    X(router_w) X(router_b) X(score_bias) X(w1) X(b1) X(w2) X(b2) X(shared_w1) X(shared_b1) X(shared_w2)              \
        X(shared_b2) X(shared_gate) X(residual_w1) X(residual_b1) X(residual_w2) X(residual_b2) X(residual_coef_w)    \
            X(residual_coef_b)

/* bind(layer, {field: pointer}) */
static PyObject *py_bind(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *dict;
    if (!PyArg_ParseTuple(args, "OO!", &capsule, &PyDict_Type, &dict)) return NULL;
    moegen_layer *layer = layer_of(capsule);
    if (!layer) return NULL;
    moegen_weights w;
    memset(&w, 0, sizeof w);
    const void *p;
#define BIND(name)                                                                                                    \
    if (pointer_item(dict, #name, &p) != 0) return NULL;                                                              \
    *(const void **)&w.name = p;
    WEIGHT_FIELDS(BIND)
#undef BIND
    moegen_error err;
    moegen_status st = moegen_layer_bind(layer, &w, &err);
    if (st != MOEGEN_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

/* The forward's io from a dict: n_tokens, x, y, topk_ids, topk_weights, router_weights,
 * counts_before, counts_after, used_token, rng_offset, stream. -1 with an exception. */
static int forward_io(PyObject *dict, moegen_forward_io *io) {
    memset(io, 0, sizeof *io);
    PyObject *n = PyDict_GetItemString(dict, "n_tokens");
    if (!n) {
        PyErr_SetString(PyExc_KeyError, "n_tokens");
        return -1;
    }
    io->n_tokens = PyLong_AsLongLong(n);
    if (io->n_tokens == -1 && PyErr_Occurred()) return -1;
    PyObject *offset = PyDict_GetItemString(dict, "rng_offset");
    if (offset && offset != Py_None) {
        io->rng_offset = PyLong_AsUnsignedLongLong(offset);
        if (PyErr_Occurred()) return -1;
    }
    const void *p;
#define IO(name, type)                                                                                                \
    if (pointer_item(dict, #name, &p) != 0) return -1;                                                                \
    io->name = (type)(uintptr_t)p;
    IO(x, const void *) IO(y, void *) IO(topk_ids, int32_t *) IO(topk_weights, float *)
        IO(router_weights, float *) IO(counts_before, int64_t *) IO(counts_after, int64_t *)
            IO(used_token, const uint8_t *) IO(stream, void *)
#undef IO
    return 0;
}

static PyObject *stats_dict(const moegen_forward_stats *s) {
    return Py_BuildValue("{s:L,s:L,s:d,s:d,s:K,s:K}", "n_dropped", (long long)s->n_dropped, "capacity",
                         (long long)s->capacity, "aux_loss", s->aux_loss, "z_loss", s->z_loss, "bytes_sent",
                         (unsigned long long)s->bytes_sent, "bytes_received", (unsigned long long)s->bytes_received);
}

/* forward(layer, io) -> stats */
static PyObject *py_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *dict;
    if (!PyArg_ParseTuple(args, "OO!", &capsule, &PyDict_Type, &dict)) return NULL;
    moegen_layer *layer = layer_of(capsule);
    moegen_forward_io io;
    if (!layer || forward_io(dict, &io) != 0) return NULL;
    moegen_forward_stats stats;
    moegen_error err;
    moegen_status st;
    Py_BEGIN_ALLOW_THREADS st = moegen_layer_forward(layer, &io, &stats, &err);
    Py_END_ALLOW_THREADS if (st != MOEGEN_OK) return raise_status(st, &err);
    return stats_dict(&stats);
}

/* ---- training --------------------------------------------------------------------------------- */

typedef struct saved_box {
    moegen_saved *saved;
    PyObject *layer; /* the layer's capsule, kept alive while the saved forward is */
} saved_box;

static void saved_destructor(PyObject *capsule) {
    saved_box *box = PyCapsule_GetPointer(capsule, "moegen.saved");
    if (!box) return;
    moegen_saved_free(box->saved);
    Py_XDECREF(box->layer);
    PyMem_Free(box);
}

static saved_box *saved_of(PyObject *capsule) { return PyCapsule_GetPointer(capsule, "moegen.saved"); }

/* forward_train(layer, io) -> (saved, stats) */
static PyObject *py_forward_train(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *dict;
    if (!PyArg_ParseTuple(args, "OO!", &capsule, &PyDict_Type, &dict)) return NULL;
    moegen_layer *layer = layer_of(capsule);
    moegen_forward_io io;
    if (!layer || forward_io(dict, &io) != 0) return NULL;
    saved_box *box = PyMem_Calloc(1, sizeof *box);
    if (!box) return PyErr_NoMemory();
    moegen_forward_stats stats;
    moegen_error err;
    moegen_status st;
    Py_BEGIN_ALLOW_THREADS st = moegen_layer_forward_train(layer, &io, &box->saved, &stats, &err);
    Py_END_ALLOW_THREADS if (st != MOEGEN_OK) {
        PyMem_Free(box);
        return raise_status(st, &err);
    }
    box->layer = capsule;
    Py_INCREF(capsule);
    PyObject *saved = PyCapsule_New(box, "moegen.saved", saved_destructor);
    if (!saved) {
        moegen_saved_free(box->saved);
        Py_DECREF(capsule);
        PyMem_Free(box);
        return NULL;
    }
    PyObject *s = stats_dict(&stats);
    if (!s) {
        Py_DECREF(saved);
        return NULL;
    }
    return Py_BuildValue("(NN)", saved, s);
}

/* Every moegen_weights field has a gradient in moegen_grads but score_bias (§8.1). */
#define GRAD_FIELDS(X)                                                                                                \
    X(router_w) X(router_b) X(w1) X(b1) X(w2) X(b2) X(shared_w1) X(shared_b1) X(shared_w2) X(shared_b2)              \
        X(shared_gate) X(residual_w1) X(residual_b1) X(residual_w2) X(residual_b2) X(residual_coef_w)                 \
            X(residual_coef_b)

/* The gradients' buffers from a dict {field: pointer} (fields as in moegen_weights). */
static int grads_from(PyObject *dict, int accumulate, moegen_grads *g) {
    memset(g, 0, sizeof *g);
    g->accumulate = accumulate;
    const void *p;
#define GRAD(name)                                                                                                    \
    if (pointer_item(dict, #name, &p) != 0) return -1;                                                                \
    g->name = (float *)(uintptr_t)p;
    GRAD_FIELDS(GRAD)
#undef GRAD
    return 0;
}

/* backward(saved, dy, dx, aux_coeff, z_coeff, grads or None, accumulate) */
static PyObject *py_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *dy, *dx, *grads_dict;
    double aux_coeff, z_coeff;
    int accumulate;
    if (!PyArg_ParseTuple(args, "OOOddOp", &capsule, &dy, &dx, &aux_coeff, &z_coeff, &grads_dict, &accumulate))
        return NULL;
    saved_box *box = saved_of(capsule);
    if (!box) return NULL;
    moegen_layer *layer = layer_of(box->layer);
    if (!layer) return NULL;
    moegen_backward_io bio;
    memset(&bio, 0, sizeof bio);
    bio.dy = dy == Py_None ? NULL : PyLong_AsVoidPtr(dy);
    bio.dx = dx == Py_None ? NULL : PyLong_AsVoidPtr(dx);
    if (PyErr_Occurred()) return NULL;
    bio.aux_coeff = aux_coeff;
    bio.z_coeff = z_coeff;
    moegen_grads grads;
    const int with_grads = grads_dict != Py_None;
    if (with_grads && (!PyDict_Check(grads_dict) || grads_from(grads_dict, accumulate, &grads) != 0)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "grads must be a dict or None");
        return NULL;
    }
    moegen_error err;
    moegen_status st;
    Py_BEGIN_ALLOW_THREADS st = moegen_layer_backward(layer, box->saved, &bio, with_grads ? &grads : NULL, &err);
    Py_END_ALLOW_THREADS if (st != MOEGEN_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

/* backward_weights(saved, grads, accumulate) */
static PyObject *py_backward_weights(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *grads_dict;
    int accumulate;
    if (!PyArg_ParseTuple(args, "OO!p", &capsule, &PyDict_Type, &grads_dict, &accumulate)) return NULL;
    saved_box *box = saved_of(capsule);
    if (!box) return NULL;
    moegen_layer *layer = layer_of(box->layer);
    moegen_grads grads;
    if (!layer || grads_from(grads_dict, accumulate, &grads) != 0) return NULL;
    moegen_error err;
    moegen_status st;
    Py_BEGIN_ALLOW_THREADS st = moegen_layer_backward_weights(layer, box->saved, &grads, &err);
    Py_END_ALLOW_THREADS if (st != MOEGEN_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

static PyObject *py_saved_bytes(PyObject *self, PyObject *capsule) {
    (void)self;
    saved_box *box = saved_of(capsule);
    return box ? PyLong_FromSize_t(moegen_saved_bytes(box->saved)) : NULL;
}

/* saved_free(saved): free the saved state now (the capsule stays, empty). */
static PyObject *py_saved_free(PyObject *self, PyObject *capsule) {
    (void)self;
    saved_box *box = saved_of(capsule);
    if (!box) return NULL;
    moegen_saved_free(box->saved);
    box->saved = NULL;
    Py_RETURN_NONE;
}

/* ---- communicators: the caller's transport in Python (torch.distributed) ------------------------
 * The library calls these from the thread running a forward (with the GIL released); each takes
 * the GIL and calls the transport object's method with writable memoryviews over the buffers.
 * An exception becomes the collective's failure message. */

static PyObject *view(void *p, size_t bytes) {
    static char empty;
    return PyMemoryView_FromMemory(bytes ? (char *)p : &empty, (Py_ssize_t)bytes, PyBUF_WRITE);
}

static int call_transport(void *user, const char *method, PyObject *args, char *why, size_t why_size) {
    int rc = 0;
    if (!args) {
        rc = 1;
    } else {
        PyObject *result = PyObject_CallMethod((PyObject *)user, method, "(O)", args); /* one argument: the tuple */
        if (!result) rc = 1;
        Py_XDECREF(result);
        Py_DECREF(args);
    }
    if (rc) {
        PyObject *type, *value, *trace;
        PyErr_Fetch(&type, &value, &trace);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
        snprintf(why, why_size, "%s: %s", method, message ? message : "the transport raised");
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(trace);
        PyErr_Clear();
    }
    return rc;
}

static PyObject *int64_list(const int64_t *values, int n) {
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) PyList_SET_ITEM(list, i, PyLong_FromLongLong((long long)values[i]));
    return list;
}

static int comm_size_of(void *user) {
    PyObject *size = PyObject_GetAttrString((PyObject *)user, "size");
    const long n = size ? PyLong_AsLong(size) : -1;
    Py_XDECREF(size);
    return (int)n;
}

static int cb_alltoall(void *user, const void *send, void *recv, size_t bytes, void *stream, double timeout_s,
                       char *why, size_t why_size) {
    (void)stream;
    PyGILState_STATE gil = PyGILState_Ensure();
    const size_t total = bytes * (size_t)comm_size_of(user);
    int rc = call_transport(user, "alltoall", Py_BuildValue("(NNnd)", view((void *)send, total), view(recv, total),
                                                             (Py_ssize_t)bytes, timeout_s),
                            why, why_size);
    PyGILState_Release(gil);
    return rc;
}

static size_t extent(const int64_t *counts, const int64_t *offsets, int n, size_t unit) {
    size_t end = 0;
    for (int i = 0; i < n; i++)
        if ((size_t)(offsets[i] + counts[i]) > end) end = (size_t)(offsets[i] + counts[i]);
    return end * unit;
}

static int cb_alltoallv(void *user, const void *send, const int64_t *send_counts, const int64_t *send_offsets,
                        void *recv, const int64_t *recv_counts, const int64_t *recv_offsets, size_t unit_bytes,
                        void *stream, double timeout_s, char *why, size_t why_size) {
    (void)stream;
    PyGILState_STATE gil = PyGILState_Ensure();
    const int n = comm_size_of(user);
    int rc = call_transport(
        user, "alltoallv",
        Py_BuildValue("(NNNNNNnd)", view((void *)send, extent(send_counts, send_offsets, n, unit_bytes)),
                      int64_list(send_counts, n), int64_list(send_offsets, n),
                      view(recv, extent(recv_counts, recv_offsets, n, unit_bytes)), int64_list(recv_counts, n),
                      int64_list(recv_offsets, n), (Py_ssize_t)unit_bytes, timeout_s),
        why, why_size);
    PyGILState_Release(gil);
    return rc;
}

static int cb_allreduce_max(void *user, int64_t *values, int n, double timeout_s, char *why, size_t why_size) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = call_transport(user, "allreduce_max",
                            Py_BuildValue("(Nd)", view(values, (size_t)n * sizeof *values), timeout_s), why,
                            why_size);
    PyGILState_Release(gil);
    return rc;
}

static int cb_allgather(void *user, const void *send, void *recv, size_t bytes, double timeout_s, char *why,
                        size_t why_size) {
    PyGILState_STATE gil = PyGILState_Ensure();
    const size_t total = bytes * (size_t)comm_size_of(user);
    int rc = call_transport(user, "allgather",
                            Py_BuildValue("(NNnd)", view((void *)send, bytes), view(recv, total),
                                          (Py_ssize_t)bytes, timeout_s),
                            why, why_size);
    PyGILState_Release(gil);
    return rc;
}

static void cb_destroy(void *user) {
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_DECREF((PyObject *)user);
    PyGILState_Release(gil);
}

static void comm_destructor(PyObject *capsule) {
    moegen_comm *comm = PyCapsule_GetPointer(capsule, "moegen.comm");
    if (comm) moegen_comm_destroy(comm); /* calls cb_destroy, which takes the GIL we hold */
}

/* comm_create(rank, size, transport, timeout_s) -> comm. The transport object has `size` and the
 * methods alltoall, alltoallv, allreduce_max, allgather (moegen/distributed.py). */
static PyObject *py_comm_create(PyObject *self, PyObject *args) {
    (void)self;
    int rank, size;
    PyObject *transport;
    double timeout_s;
    if (!PyArg_ParseTuple(args, "iiOd", &rank, &size, &transport, &timeout_s)) return NULL;
    moegen_comm_callbacks callbacks = {cb_alltoall, cb_alltoallv, cb_allreduce_max, cb_allgather, cb_destroy};
    moegen_comm *comm = NULL;
    moegen_error err;
    Py_INCREF(transport); /* released by cb_destroy */
    moegen_status st = moegen_comm_create(rank, size, &callbacks, transport, &comm, &err);
    if (st != MOEGEN_OK) {
        Py_DECREF(transport);
        return raise_status(st, &err);
    }
    if (timeout_s > 0 && (st = moegen_comm_set_timeout(comm, timeout_s, &err)) != MOEGEN_OK) {
        moegen_comm_destroy(comm);
        return raise_status(st, &err);
    }
    PyObject *capsule = PyCapsule_New(comm, "moegen.comm", comm_destructor);
    if (!capsule) moegen_comm_destroy(comm);
    return capsule;
}

static PyObject *py_version(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(MOEGEN_VERSION);
}

static PyMethodDef methods[] = {
    {"set_error_class", set_error_class, METH_O, "the exception class raised for moegen statuses"},
    {"open", py_open, METH_VARARGS, "open a layer from spec text"},
    {"describe", py_describe, METH_O, "the layer's description (a dict)"},
    {"bind", py_bind, METH_VARARGS, "bind weights given as {field: data pointer}"},
    {"forward", py_forward, METH_VARARGS, "run the forward; io is a dict of pointers"},
    {"forward_train", py_forward_train, METH_VARARGS, "a forward that keeps what the backward needs"},
    {"backward", py_backward, METH_VARARGS, "the backward of a saved forward"},
    {"backward_weights", py_backward_weights, METH_VARARGS, "the weight gradients of a saved forward"},
    {"saved_bytes", py_saved_bytes, METH_O, "bytes a saved forward holds"},
    {"saved_free", py_saved_free, METH_O, "free a saved forward now"},
    {"comm_create", py_comm_create, METH_VARARGS, "a communicator over a Python transport"},
    {"version", py_version, METH_NOARGS, "libmoegen's version"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "moegen._C", "libmoegen's C API (moegen.h)", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
