/*
 * agent._relay: the relay's request path (agent/proxy_relay.py) without the interpreter.
 *
 * Why C: a relayed call is two recv/send pairs; in Python each pair costs a thread taking the
 * GIL back from whatever holds it (the monitor thread reading calls, the exporter), which is
 * the relay's added latency. pump() holds the GIL only on entry and exit: in between it
 * relays one direction of one connection, and copies each chunk into a Queue that the
 * monitor's thread drains under the GIL (take()). The pure-Python pump in agent/proxy_relay.py
 * does the same when this module is not built.
 *
 * A Queue is bounded in bytes. A chunk that does not fit is not copied; the connection's flag
 * (one byte both its pumps share) turns 0 and neither pump copies for it again: the tap cannot
 * follow a connection with a gap in it, and the bytes themselves go on regardless.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define CHUNK_BYTES (256 * 1024)

typedef struct Entry {
    struct Entry *next;
    long long conn;
    int from_client;   /* -1: the connection ended (its last chunk is before this) */
    long long ts;      /* CLOCK_MONOTONIC ns, as time.perf_counter_ns() on Linux */
    Py_ssize_t len;
    char data[];
} Entry;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    Entry *head, *tail;
    Py_ssize_t bytes, max_bytes, entries;
    unsigned long long dropped;  /* chunks not copied: the queue was full */
} Queue;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Called without the GIL. Returns 0 when the queue was full (nothing kept). */
static int push(Queue *q, long long conn, int from_client, long long ts, const char *data, Py_ssize_t len) {
    pthread_mutex_lock(&q->lock);
    int fits = len <= 0 || q->bytes + len <= q->max_bytes;  /* an end marker always fits */

    if (!fits) q->dropped++;
    pthread_mutex_unlock(&q->lock);
    if (!fits) return 0;
    Entry *e = malloc(sizeof(Entry) + (len > 0 ? len : 0));
    if (e == NULL) {
        pthread_mutex_lock(&q->lock);
        q->dropped++;
        pthread_mutex_unlock(&q->lock);
        return 0;
    }
    e->next = NULL; e->conn = conn; e->from_client = from_client; e->ts = ts; e->len = len;
    if (len > 0) memcpy(e->data, data, len);
    pthread_mutex_lock(&q->lock);
    if (q->tail) q->tail->next = e; else q->head = e;
    q->tail = e;
    q->bytes += len > 0 ? len : 0;
    q->entries++;
    pthread_mutex_unlock(&q->lock);
    return 1;
}

static int send_all(int fd, const char *data, Py_ssize_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, (size_t)len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += n; len -= n;
    }
    return 0;
}

/* pump(src_fd, dst_fd, conn, from_client, flag) -> errno (0: the source closed its side) */
static PyObject *Queue_pump(Queue *self, PyObject *args) {
    int src, dst, from_client;
    long long conn;
    Py_buffer flag;
    if (!PyArg_ParseTuple(args, "iiLpw*", &src, &dst, &conn, &from_client, &flag)) return NULL;
    if (flag.len < 1) {
        PyBuffer_Release(&flag);
        PyErr_SetString(PyExc_ValueError, "flag: a writable buffer of at least one byte");
        return NULL;
    }
    volatile char *observed = (volatile char *)flag.buf;
    char *buf = malloc(CHUNK_BYTES);
    if (buf == NULL) {
        PyBuffer_Release(&flag);
        return PyErr_NoMemory();
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        ssize_t n = recv(src, buf, CHUNK_BYTES, 0);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        long long ts = now_ns();
        /* copied before it is sent on: a request is queued before the upstream can answer it (the tap
           sees a request before its reply), a reply before the client has it (whoever saw an answer can
           count on the monitor having been handed it, as with the gRPC front); a copy is a memcpy */
        if (*observed && !push(self, conn, from_client, ts, buf, n)) *observed = 0;
        if (send_all(dst, buf, n) < 0) {
            err = errno;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    free(buf);
    PyBuffer_Release(&flag);
    return PyLong_FromLong(err);
}

/* push(conn, from_client, ts, data) -> bool: what pump does with a chunk, for the end marker
   (from_client -1, no data) and for tests */
static PyObject *Queue_push(Queue *self, PyObject *args) {
    long long conn, ts;
    int from_client;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "LiLy*", &conn, &from_client, &ts, &data)) return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = push(self, conn, from_client, ts, data.buf, data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyBool_FromLong(ok);
}

/* take() -> [(conn, from_client, ts, bytes)], oldest first, the queue emptied */
static PyObject *Queue_take(Queue *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->lock);
    Entry *e = self->head;
    self->head = self->tail = NULL;
    self->bytes = 0;
    Py_ssize_t count = self->entries;
    self->entries = 0;
    pthread_mutex_unlock(&self->lock);
    PyObject *out = PyList_New(count);
    Py_ssize_t i = 0;
    while (e != NULL) {
        Entry *next = e->next;
        if (out != NULL) {
            PyObject *item = Py_BuildValue("(LiLy#)", e->conn, e->from_client, e->ts, e->data,
                                           e->len > 0 ? e->len : (Py_ssize_t)0);
            if (item == NULL) {
                Py_CLEAR(out);
            } else if (i < count) {
                PyList_SET_ITEM(out, i++, item);
            } else {
                Py_DECREF(item);
            }
        }
        free(e);
        e = next;
    }
    return out;
}

static PyObject *Queue_len(Queue *self, void *Py_UNUSED(closure)) {
    pthread_mutex_lock(&self->lock);
    Py_ssize_t n = self->entries;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSsize_t(n);
}

static PyObject *Queue_dropped(Queue *self, void *Py_UNUSED(closure)) {
    pthread_mutex_lock(&self->lock);
    unsigned long long n = self->dropped;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromUnsignedLongLong(n);
}

static int Queue_init(Queue *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"max_bytes", NULL};
    Py_ssize_t max_bytes = 64 * 1024 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", names, &max_bytes)) return -1;
    if (max_bytes < 0) {
        PyErr_SetString(PyExc_ValueError, "max_bytes must not be negative");
        return -1;
    }
    self->max_bytes = max_bytes;
    return 0;
}

static PyObject *Queue_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Queue *self = (Queue *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    pthread_mutex_init(&self->lock, NULL);
    self->head = self->tail = NULL;
    self->bytes = self->entries = 0;
    self->dropped = 0;
    self->max_bytes = 64 * 1024 * 1024;
    return (PyObject *)self;
}

static void Queue_dealloc(Queue *self) {
    Entry *e = self->head;
    while (e != NULL) {
        Entry *next = e->next;
        free(e);
        e = next;
    }
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Queue_methods[] = {
    {"pump", (PyCFunction)Queue_pump, METH_VARARGS,
     "pump(src_fd, dst_fd, conn, from_client, flag) -> errno: relay src to dst until src ends, copying chunks here"},
    {"push", (PyCFunction)Queue_push, METH_VARARGS, "push(conn, from_client, ts, data) -> bool"},
    {"take", (PyCFunction)Queue_take, METH_NOARGS, "take() -> [(conn, from_client, ts, bytes)]"},
    {NULL}
};

static PyGetSetDef Queue_getset[] = {
    {"entries", (getter)Queue_len, NULL, "chunks waiting", NULL},
    {"dropped", (getter)Queue_dropped, NULL, "chunks not copied: the queue was full", NULL},
    {NULL}
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._relay.Queue",
    .tp_basicsize = sizeof(Queue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Chunks relayed, copied for the monitor: bounded in bytes",
    .tp_new = Queue_new,
    .tp_init = (initproc)Queue_init,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_methods = Queue_methods,
    .tp_getset = Queue_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "agent._relay", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&QueueType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&QueueType);
    if (PyModule_AddObject(m, "Queue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(&QueueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
