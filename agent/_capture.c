/*
 * agent._capture: the hot-path copy into the ring, in one C call.
 *
 * Why C: after an onnxruntime call the interpreter runs cold, and each Python
 * statement of the copy (slice, assign, header update, lock) costs 2-3x its
 * micro-benchmark time; doing the whole capture in one call keeps the added
 * latency well under the microsecond budget. The pure-Python closure in
 * agent/session.py does the same work and is used when this module is not
 * built, or when a model has string / ZipMap tensors.
 *
 * Concurrency: capture() never releases the GIL, so calls from several Python
 * threads are serialised by it; the counters it shares with Python code are
 * updated through count() for the same reason. The head counters are
 * published with release stores after the rows are written, so a reader that
 * loads the head (acquire) sees whole rows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { ROWS_HEAD, ROWS_TAIL, CALLS_HEAD, CALLS_TAIL, DROPPED, ERRORS };

typedef struct {
    char *base;           /* first row of this slot's ring array */
    Py_ssize_t row_bytes; /* bytes per row */
    Py_ssize_t itemsize;
    char format;          /* expected buffer format character */
    PyObject *key;        /* input name (feed dict key), or NULL for an output */
    Py_ssize_t index;     /* output position when key is NULL */
} Slot;

typedef struct {
    PyObject_HEAD
    Py_buffer ring;       /* the whole ring buffer, held writable for our lifetime */
    int64_t *hdr;
    int64_t *lat;
    int64_t rows, calls;  /* powers of two */
    Py_ssize_t nslots;
    Slot *slots;
    PyObject *first;      /* the input whose length is the row count */
} Capture;

static char normal_format(const char *fmt) {
    if (fmt == NULL) return 'B';
    while (*fmt == '@' || *fmt == '=' || *fmt == '<') fmt++;
    /* 'l' and 'q' are both int64 here (itemsize is checked as well) */
    if (*fmt == 'q') return 'l';
    if (*fmt == 'Q') return 'L';
    return *fmt;
}

static void Capture_dealloc(Capture *self) {
    if (self->slots) {
        for (Py_ssize_t i = 0; i < self->nslots; i++) Py_XDECREF(self->slots[i].key);
        PyMem_Free(self->slots);
    }
    Py_XDECREF(self->first);
    if (self->ring.obj) PyBuffer_Release(&self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Capture(buffer, latency_offset, rows, calls, first, slots)
 * slots: sequence of (offset, row_bytes, itemsize, format, key_or_index) */
static int Capture_init(Capture *self, PyObject *args, PyObject *kwds) {
    PyObject *buffer, *first, *slots;
    Py_ssize_t lat_off;
    long long rows, calls;
    if (!PyArg_ParseTuple(args, "OnLLOO", &buffer, &lat_off, &rows, &calls, &first, &slots)) return -1;
    if (PyObject_GetBuffer(buffer, &self->ring, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    char *base = (char *)self->ring.buf;
    self->hdr = (int64_t *)base;
    self->lat = (int64_t *)(base + lat_off);
    self->rows = rows;
    self->calls = calls;
    Py_INCREF(first);
    self->first = first;
    PyObject *seq = PySequence_Fast(slots, "slots must be a sequence");
    if (!seq) return -1;
    self->nslots = PySequence_Fast_GET_SIZE(seq);
    self->slots = PyMem_Calloc(self->nslots ? self->nslots : 1, sizeof(Slot));
    for (Py_ssize_t i = 0; i < self->nslots; i++) {
        Py_ssize_t off, row_bytes, itemsize;
        const char *fmt;
        PyObject *key;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "nnnsO", &off, &row_bytes, &itemsize, &fmt, &key)) {
            Py_DECREF(seq);
            return -1;
        }
        Slot *s = &self->slots[i];
        s->base = base + off;
        s->row_bytes = row_bytes;
        s->itemsize = itemsize;
        s->format = normal_format(fmt);
        if (PyLong_Check(key)) {
            s->index = PyLong_AsSsize_t(key);
        } else {
            Py_INCREF(key);
            s->key = key;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* Copy `len` bytes of a (possibly strided) buffer into ring rows starting at row i. */
static int copy_rows(Capture *self, Slot *s, Py_buffer *view, int64_t i, Py_ssize_t n) {
    Py_ssize_t len = n * s->row_bytes;
    Py_ssize_t room = (Py_ssize_t)(self->rows - i) * s->row_bytes;
    char *dst = s->base + i * s->row_bytes;
    int contiguous = PyBuffer_IsContiguous(view, 'C');
    if (len <= room) {
        if (contiguous) { memcpy(dst, view->buf, len); return 0; }
        return PyBuffer_ToContiguous(dst, view, len, 'C');
    }
    /* straddles the end of the ring: two pieces */
    const char *src = view->buf;
    char *tmp = NULL;
    if (!contiguous) {
        tmp = PyMem_Malloc(len);
        if (!tmp || PyBuffer_ToContiguous(tmp, view, len, 'C') < 0) { PyMem_Free(tmp); return -1; }
        src = tmp;
    }
    memcpy(dst, src, room);
    memcpy(s->base, src + room, len - room);
    PyMem_Free(tmp);
    return 0;
}

/* capture(feed, outputs, latency_ns) -> bool: False when the rows were dropped */
static PyObject *Capture_call(Capture *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "capture(feed, outputs, latency_ns)"); return NULL; }
    PyObject *feed = args[0], *outs = args[1];
    int64_t latency = PyLong_AsLongLong(args[2]);
    PyObject *first = PyDict_GetItemWithError(feed, self->first);
    if (!first) { if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, self->first); return NULL; }
    Py_ssize_t n = PyObject_Size(first);
    if (n < 0) return NULL;
    int64_t *hdr = self->hdr;
    int64_t head = hdr[ROWS_HEAD];
    int64_t ncall = hdr[CALLS_HEAD];
    int64_t rows_tail = __atomic_load_n(&hdr[ROWS_TAIL], __ATOMIC_ACQUIRE);
    int64_t calls_tail = __atomic_load_n(&hdr[CALLS_TAIL], __ATOMIC_ACQUIRE);
    if (n == 0) Py_RETURN_TRUE;
    if (head + n - rows_tail > self->rows || ncall - calls_tail >= self->calls) {
        hdr[DROPPED] += n;  /* the ring is full: the worker is behind */
        Py_RETURN_FALSE;
    }
    int64_t i = head & (self->rows - 1);
    for (Py_ssize_t k = 0; k < self->nslots; k++) {
        Slot *s = &self->slots[k];
        PyObject *obj = s->key ? PyDict_GetItemWithError(feed, s->key)
                               : (PyList_Check(outs) && s->index < PyList_GET_SIZE(outs)
                                      ? PyList_GET_ITEM(outs, s->index) : NULL);
        Py_buffer view;
        if (!obj || PyObject_GetBuffer(obj, &view, PyBUF_RECORDS_RO) < 0) {
            PyErr_Clear();
            hdr[DROPPED] += n;  /* not a buffer we can copy (e.g. a list): counted, not copied */
            Py_RETURN_FALSE;
        }
        int ok = view.itemsize == s->itemsize && normal_format(view.format) == s->format
                 && view.len == n * s->row_bytes;
        if (!ok || copy_rows(self, s, &view, i, n) < 0) {
            PyBuffer_Release(&view);
            PyErr_Clear();
            hdr[DROPPED] += n;
            Py_RETURN_FALSE;
        }
        PyBuffer_Release(&view);
    }
    self->lat[ncall & (self->calls - 1)] = latency;
    __atomic_store_n(&hdr[CALLS_HEAD], ncall + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&hdr[ROWS_HEAD], head + n, __ATOMIC_RELEASE);
    Py_RETURN_TRUE;
}

/* count(field, amount): add to a header counter, atomically with respect to capture() */
static PyObject *Capture_count(Capture *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "count(field, amount)"); return NULL; }
    Py_ssize_t field = PyLong_AsSsize_t(args[0]);
    long long amount = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (field != DROPPED && field != ERRORS) { PyErr_SetString(PyExc_ValueError, "field must be DROPPED or ERRORS"); return NULL; }
    self->hdr[field] += amount;
    Py_RETURN_NONE;
}

static PyMethodDef Capture_methods[] = {
    {"capture", (PyCFunction)(void (*)(void))Capture_call, METH_FASTCALL,
     "capture(feed, outputs, latency_ns) -> bool: copy one call's rows into the ring"},
    {"count", (PyCFunction)(void (*)(void))Capture_count, METH_FASTCALL,
     "count(field, amount): add to the DROPPED or ERRORS counter"},
    {NULL}
};

static PyTypeObject CaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._capture.Capture",
    .tp_basicsize = sizeof(Capture),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Copies a call's tensors into the ring (see agent/session.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Capture_init,
    .tp_dealloc = (destructor)Capture_dealloc,
    .tp_methods = Capture_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "agent._capture", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__capture(void) {
    if (PyType_Ready(&CaptureType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&CaptureType);
    if (PyModule_AddObject(m, "Capture", (PyObject *)&CaptureType) < 0) { Py_DECREF(&CaptureType); Py_DECREF(m); return NULL; }
    return m;
}
