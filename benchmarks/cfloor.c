/*
 * The contract's least work, compiled: what `floor.py`'s "checked" layer does
 * (a pooled hex id in scope state and a ContextVar, structlog's three
 * ContextVars, the start held and its headers scanned, the msgspec check, the
 * body spliced into the envelope) written against the C API, so the floor
 * under issue #2's goal is measured for compiled code as well as for Python.
 *
 * A measuring prototype, not a middleware: it serves the benchmark's one
 * response shape (a start, then one whole JSON body) and nothing else. It
 * needs no build system: `floor.py` compiles it with the system C compiler.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

static PyObject *k_type, *k_status, *k_headers, *k_body, *k_state, *k_request_id, *k_method, *k_path;
static PyObject *v_http, *v_start, *v_body;
static PyObject *h_content_type, *h_content_length, *h_request_id, *v_json;

/* -- awaiting ------------------------------------------------------------- */

static PyObject *
await_iter(PyObject *awaitable)
{
    if (PyCoro_CheckExact(awaitable))
        return Py_NewRef(awaitable);
    PyAsyncMethods *am = Py_TYPE(awaitable)->tp_as_async;
    if (am != NULL && am->am_await != NULL)
        return am->am_await(awaitable);
    PyErr_Format(PyExc_TypeError, "%.100s is not awaitable", Py_TYPE(awaitable)->tp_name);
    return NULL;
}

/* tp_iternext for an object with am_send: StopIteration carries the return value. */
static PyObject *
next_via_send(PyObject *self)
{
    PyObject *result;
    PySendResult status = Py_TYPE(self)->tp_as_async->am_send(self, Py_None, &result);
    if (status == PYGEN_NEXT)
        return result;
    if (status == PYGEN_RETURN) {
        if (result != Py_None) {
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
        }
        Py_DECREF(result);
    }
    return NULL;
}

/* Throw into `inner` (an iterator being awaited): what it yields, or NULL with the
 * error set (StopIteration when it returned). */
static PyObject *
throw_into(PyObject *inner, PyObject *args)
{
    PyObject *throw = PyObject_GetAttrString(inner, "throw");
    if (throw == NULL) {
        PyErr_Clear();
        PyObject *type, *value = NULL, *tb = NULL;
        if (!PyArg_UnpackTuple(args, "throw", 1, 3, &type, &value, &tb))
            return NULL;
        PyErr_SetObject(type, value);
        return NULL;
    }
    PyObject *result = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    return result;
}

/* -- Done: what awaiting a held start gives ------------------------------- */

typedef struct {
    PyObject_HEAD
} Done;

static PySendResult
done_send(PyObject *self, PyObject *arg, PyObject **result)
{
    *result = Py_NewRef(Py_None);
    return PYGEN_RETURN;
}

static PyObject *
self_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PyAsyncMethods done_async = {.am_await = self_await, .am_send = done_send};

static PyTypeObject DoneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cfloor.Done",
    .tp_basicsize = sizeof(Done),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_as_async = &done_async,
    .tp_iter = self_await,
    .tp_iternext = next_via_send,
};

static PyObject *done;

/* -- Pair: await one send, then another ----------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *send;
    PyObject *second;  /* the message to send next, or NULL */
    PyObject *current; /* the iterator being awaited */
} Pair;

static void
pair_dealloc(Pair *self)
{
    Py_XDECREF(self->send);
    Py_XDECREF(self->second);
    Py_XDECREF(self->current);
    PyObject_Free(self);
}

static int
pair_advance(Pair *self)
{
    PyObject *awaitable = PyObject_CallOneArg(self->send, self->second);
    Py_CLEAR(self->second);
    if (awaitable == NULL)
        return -1;
    PyObject *iter = await_iter(awaitable);
    Py_DECREF(awaitable);
    if (iter == NULL)
        return -1;
    Py_SETREF(self->current, iter);
    return 0;
}

static PySendResult
pair_send(PyObject *op, PyObject *arg, PyObject **result)
{
    Pair *self = (Pair *)op;
    for (;;) {
        PySendResult status = PyIter_Send(self->current, arg, result);
        if (status != PYGEN_RETURN || self->second == NULL)
            return status;
        Py_DECREF(*result);
        if (pair_advance(self) < 0) {
            *result = NULL;
            return PYGEN_ERROR;
        }
        arg = Py_None;
    }
}

static PyObject *
pair_throw(PyObject *op, PyObject *args)
{
    Pair *self = (Pair *)op;
    Py_CLEAR(self->second); /* a failed or cancelled send ends the pair */
    return throw_into(self->current, args);
}

static PyMethodDef pair_methods[] = {{"throw", pair_throw, METH_VARARGS, NULL}, {NULL}};
static PyAsyncMethods pair_async = {.am_await = self_await, .am_send = pair_send};

static PyTypeObject PairType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cfloor.Pair",
    .tp_basicsize = sizeof(Pair),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)pair_dealloc,
    .tp_as_async = &pair_async,
    .tp_iter = self_await,
    .tp_iternext = next_via_send,
    .tp_methods = pair_methods,
};

/* -- Splice: the `send` the app is given ---------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *send;
    PyObject *check;      /* msgspec's decode, or NULL */
    PyObject *request_id; /* bytes */
    PyObject *status;     /* of the held start */
    PyObject *kept;       /* its headers a wrapped body keeps */
} Splice;

static void
splice_dealloc(Splice *self)
{
    Py_XDECREF(self->send);
    Py_XDECREF(self->check);
    Py_XDECREF(self->request_id);
    Py_XDECREF(self->status);
    Py_XDECREF(self->kept);
    PyObject_Free(self);
}

static int
dropped(PyObject *name)
{
    /* The floor's _DROP, matched without case. */
    static const char *const drop[] = {"content-length", "content-type", "x-request-id", "etag", "digest"};
    Py_ssize_t size = PyBytes_GET_SIZE(name);
    const char *bytes = PyBytes_AS_STRING(name);
    for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++) {
        if ((Py_ssize_t)strlen(drop[i]) == size && PyOS_strnicmp(bytes, drop[i], size) == 0)
            return 1;
    }
    return 0;
}

static PyObject *
header(PyObject *name, PyObject *value)
{
    return PyTuple_Pack(2, name, value);
}

static PyObject *
splice_start(Splice *self, PyObject *message)
{
    PyObject *headers = PyDict_GetItemWithError(message, k_headers);
    PyObject *status = PyDict_GetItemWithError(message, k_status);
    if (headers == NULL || status == NULL || !PyList_Check(headers))
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "a start without status or headers");
    PyObject *kept = PyList_New(0);
    if (kept == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))) {
            Py_DECREF(kept);
            return PyErr_Format(PyExc_ValueError, "headers are (bytes, bytes) tuples");
        }
        if (!dropped(PyTuple_GET_ITEM(pair, 0)) && PyList_Append(kept, pair) < 0) {
            Py_DECREF(kept);
            return NULL;
        }
    }
    Py_XSETREF(self->kept, kept);
    Py_XSETREF(self->status, Py_NewRef(status));
    return Py_NewRef(done);
}

static PyObject *
splice_body(Splice *self, PyObject *message)
{
    PyObject *data = PyDict_GetItemWithError(message, k_body);
    if (data == NULL || !PyBytes_Check(data) || self->kept == NULL)
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "a body of bytes after a start");
    if (self->check != NULL) {
        PyObject *checked = PyObject_CallOneArg(self->check, data);
        if (checked == NULL)
            return NULL;
        Py_DECREF(checked);
    }
    static const char head[] = "{\"request_id\":\"", middle[] = "\",\"data\":";
    Py_ssize_t id_size = PyBytes_GET_SIZE(self->request_id), data_size = PyBytes_GET_SIZE(data);
    Py_ssize_t size = (Py_ssize_t)(sizeof(head) - 1 + sizeof(middle) - 1) + id_size + data_size + 1;
    PyObject *body = PyBytes_FromStringAndSize(NULL, size);
    if (body == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(body);
    memcpy(out, head, sizeof(head) - 1);
    out += sizeof(head) - 1;
    memcpy(out, PyBytes_AS_STRING(self->request_id), id_size);
    out += id_size;
    memcpy(out, middle, sizeof(middle) - 1);
    out += sizeof(middle) - 1;
    memcpy(out, PyBytes_AS_STRING(data), data_size);
    out[data_size] = '}';

    PyObject *length = PyBytes_FromFormat("%zd", size);
    PyObject *start = NULL, *end = NULL, *pair_ct = NULL, *pair_cl = NULL, *pair_id = NULL;
    PyObject *headers = self->kept; /* handed over: the start is sent once */
    self->kept = NULL;
    if (length == NULL)
        goto fail;
    pair_ct = header(h_content_type, v_json);
    pair_cl = header(h_content_length, length);
    pair_id = header(h_request_id, self->request_id);
    if (pair_ct == NULL || pair_cl == NULL || pair_id == NULL || PyList_Append(headers, pair_ct) < 0 ||
        PyList_Append(headers, pair_cl) < 0 || PyList_Append(headers, pair_id) < 0)
        goto fail;
    start = PyDict_New();
    end = PyDict_New();
    if (start == NULL || end == NULL || PyDict_SetItem(start, k_type, v_start) < 0 ||
        PyDict_SetItem(start, k_status, self->status) < 0 || PyDict_SetItem(start, k_headers, headers) < 0 ||
        PyDict_SetItem(end, k_type, v_body) < 0 || PyDict_SetItem(end, k_body, body) < 0)
        goto fail;
    Pair *pair = PyObject_New(Pair, &PairType);
    if (pair == NULL)
        goto fail;
    pair->send = Py_NewRef(self->send);
    pair->second = Py_NewRef(end);
    pair->current = NULL;
    PyObject *awaitable = PyObject_CallOneArg(self->send, start);
    if (awaitable != NULL) {
        pair->current = await_iter(awaitable);
        Py_DECREF(awaitable);
    }
    Py_DECREF(length);
    Py_DECREF(pair_ct);
    Py_DECREF(pair_cl);
    Py_DECREF(pair_id);
    Py_DECREF(headers);
    Py_DECREF(start);
    Py_DECREF(end);
    Py_DECREF(body);
    if (pair->current == NULL) {
        Py_DECREF(pair);
        return NULL;
    }
    return (PyObject *)pair;
fail:
    Py_XDECREF(length);
    Py_XDECREF(pair_ct);
    Py_XDECREF(pair_cl);
    Py_XDECREF(pair_id);
    Py_XDECREF(headers);
    Py_XDECREF(start);
    Py_XDECREF(end);
    Py_DECREF(body);
    return NULL;
}

static PyObject *
splice_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Splice *self = (Splice *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL || !PyDict_Check(args[0]))
        return PyErr_Format(PyExc_TypeError, "send takes one message");
    PyObject *kind = PyDict_GetItemWithError(args[0], k_type);
    if (kind == NULL)
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "a message without a type");
    if (kind == v_start || PyUnicode_Compare(kind, v_start) == 0)
        return splice_start(self, args[0]);
    return splice_body(self, args[0]);
}

static PyTypeObject SpliceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cfloor.Splice",
    .tp_basicsize = sizeof(Splice),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_dealloc = (destructor)splice_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Splice, vectorcall),
};

/* -- Layer and its per-request awaitable ---------------------------------- */

/* The id's own ContextVar, then structlog's request_id, method and path; a None
 * among them is a ContextVar the layer does not set. */
#define VARS 4

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *app;
    PyObject *vars[VARS];
    PyObject *check;
} Layer;

typedef struct {
    PyObject_HEAD
    Layer *layer;
    PyObject *scope, *receive, *send; /* until the request starts */
    PyObject *inner;                  /* the app's coroutine, once started */
    PyObject *tokens[VARS];
    int done;
} Call;

static unsigned char pool[4096];
static size_t pool_left = 0;

static PyObject *
new_request_id(void)
{
    /* 128 random bits as 32 lowercase hex characters, drawn from a pool as
     * hex_request_id() does: one system call per 256 ids. */
    if (pool_left < 16) {
        if (_PyOS_URandom(pool, sizeof(pool)) < 0)
            return NULL;
        pool_left = sizeof(pool);
    }
    pool_left -= 16;
    static const char digits[] = "0123456789abcdef";
    PyObject *id = PyUnicode_New(32, 127);
    if (id == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(id);
    for (int i = 0; i < 16; i++) {
        out[2 * i] = digits[pool[pool_left + i] >> 4];
        out[2 * i + 1] = digits[pool[pool_left + i] & 15];
    }
    return id;
}

static void
call_clear(Call *self)
{
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive);
    Py_CLEAR(self->send);
    Py_CLEAR(self->inner);
    for (int i = 0; i < VARS; i++)
        Py_CLEAR(self->tokens[i]);
}

static void
call_dealloc(Call *self)
{
    call_clear(self);
    Py_XDECREF(self->layer);
    PyObject_Free(self);
}

/* The request's end: each ContextVar back as it was, in reverse order; an error
 * in flight is kept. */
static void
call_finish(Call *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    for (int i = VARS - 1; i >= 0; i--) {
        if (self->tokens[i] != NULL && PyContextVar_Reset(self->layer->vars[i], self->tokens[i]) < 0)
            PyErr_WriteUnraisable((PyObject *)self);
    }
    self->done = 1;
    call_clear(self);
    PyErr_Restore(type, value, tb);
}

static int
call_begin(Call *self)
{
    PyObject *request_id = new_request_id();
    if (request_id == NULL)
        return -1;
    PyObject *encoded = PyUnicode_AsASCIIString(request_id);
    PyObject *state = PyDict_GetItemWithError(self->scope, k_state);
    PyObject *method = PyDict_GetItemWithError(self->scope, k_method);
    PyObject *path = PyDict_GetItemWithError(self->scope, k_path);
    Splice *splice = NULL;
    if (encoded == NULL || state == NULL || method == NULL || path == NULL ||
        PyDict_SetItem(state, k_request_id, request_id) < 0)
        goto fail;
    PyObject *values[VARS] = {request_id, request_id, method, path};
    for (int i = 0; i < VARS; i++) {
        if (self->layer->vars[i] == NULL)
            continue;
        if ((self->tokens[i] = PyContextVar_Set(self->layer->vars[i], values[i])) == NULL)
            goto fail;
    }
    splice = PyObject_New(Splice, &SpliceType);
    if (splice == NULL)
        goto fail;
    splice->vectorcall = splice_call;
    splice->send = Py_NewRef(self->send);
    splice->check = Py_XNewRef(self->layer->check);
    splice->request_id = Py_NewRef(encoded);
    splice->status = NULL;
    splice->kept = NULL;
    PyObject *args[3] = {self->scope, self->receive, (PyObject *)splice};
    PyObject *coroutine = PyObject_Vectorcall(self->layer->app, args, 3, NULL);
    if (coroutine == NULL)
        goto fail;
    self->inner = await_iter(coroutine);
    Py_DECREF(coroutine);
    if (self->inner == NULL)
        goto fail;
    Py_DECREF(splice);
    Py_DECREF(encoded);
    Py_DECREF(request_id);
    return 0;
fail:
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_KeyError, "scope without state, method or path");
    Py_XDECREF(splice);
    Py_XDECREF(encoded);
    Py_DECREF(request_id);
    return -1;
}

static PySendResult
call_send(PyObject *op, PyObject *arg, PyObject **result)
{
    Call *self = (Call *)op;
    if (self->done) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited request");
        *result = NULL;
        return PYGEN_ERROR;
    }
    if (self->inner == NULL && call_begin(self) < 0) {
        call_finish(self);
        *result = NULL;
        return PYGEN_ERROR;
    }
    PySendResult status = PyIter_Send(self->inner, arg, result);
    if (status != PYGEN_NEXT)
        call_finish(self);
    return status;
}

static PyObject *
call_throw(PyObject *op, PyObject *args)
{
    Call *self = (Call *)op;
    if (self->inner == NULL || self->done) {
        call_finish(self);
        PyObject *type, *value = NULL, *tb = NULL;
        if (PyArg_UnpackTuple(args, "throw", 1, 3, &type, &value, &tb))
            PyErr_SetObject(type, value);
        return NULL;
    }
    PyObject *result = throw_into(self->inner, args);
    if (result == NULL)
        call_finish(self);
    return result;
}

static PyObject *
call_close(PyObject *op, PyObject *unused)
{
    Call *self = (Call *)op;
    PyObject *result = self->inner == NULL ? Py_NewRef(Py_None) : PyObject_CallMethod(self->inner, "close", NULL);
    if (!self->done)
        call_finish(self);
    return result;
}

static PyMethodDef call_methods[] = {
    {"throw", call_throw, METH_VARARGS, NULL},
    {"close", call_close, METH_NOARGS, NULL},
    {NULL},
};
static PyAsyncMethods call_async = {.am_await = self_await, .am_send = call_send};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cfloor.Call",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)call_dealloc,
    .tp_as_async = &call_async,
    .tp_iter = self_await,
    .tp_iternext = next_via_send,
    .tp_methods = call_methods,
};

static PyObject *
layer_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Layer *self = (Layer *)op;
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL || !PyDict_Check(args[0]))
        return PyErr_Format(PyExc_TypeError, "an ASGI app takes scope, receive and send");
    PyObject *kind = PyDict_GetItemWithError(args[0], k_type);
    if (kind == NULL || PyUnicode_Compare(kind, v_http) != 0) {
        if (PyErr_Occurred())
            return NULL;
        return PyObject_Vectorcall(self->app, args, 3, NULL);
    }
    Call *call = PyObject_New(Call, &CallType);
    if (call == NULL)
        return NULL;
    call->layer = (Layer *)Py_NewRef(op);
    call->scope = Py_NewRef(args[0]);
    call->receive = Py_NewRef(args[1]);
    call->send = Py_NewRef(args[2]);
    call->inner = NULL;
    for (int i = 0; i < VARS; i++)
        call->tokens[i] = NULL;
    call->done = 0;
    return (PyObject *)call;
}

static void
layer_dealloc(Layer *self)
{
    Py_XDECREF(self->app);
    for (int i = 0; i < VARS; i++)
        Py_XDECREF(self->vars[i]);
    Py_XDECREF(self->check);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *
layer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *app, *vars, *check;
    if (!PyArg_ParseTuple(args, "OO!O:Layer", &app, &PyTuple_Type, &vars, &check))
        return NULL;
    if (PyTuple_GET_SIZE(vars) != VARS)
        return PyErr_Format(PyExc_ValueError, "Layer takes %d ContextVars or Nones", VARS);
    Layer *self = (Layer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = layer_call;
    self->app = Py_NewRef(app);
    for (int i = 0; i < VARS; i++) {
        PyObject *var = PyTuple_GET_ITEM(vars, i);
        self->vars[i] = var == Py_None ? NULL : Py_NewRef(var);
    }
    self->check = check == Py_None ? NULL : Py_NewRef(check);
    return (PyObject *)self;
}

static PyTypeObject LayerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cfloor.Layer",
    .tp_doc = "Layer(app, (own_var, id_var, method_var, path_var), check_or_None); a var may be None",
    .tp_basicsize = sizeof(Layer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = layer_new,
    .tp_dealloc = (destructor)layer_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Layer, vectorcall),
};

/* -- module --------------------------------------------------------------- */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "cfloor", NULL, -1, NULL};

#define INTERN(var, text)                                                                          \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                          \
        return NULL;
#define BYTES(var, text)                                                                           \
    if ((var = PyBytes_FromString(text)) == NULL)                                                  \
        return NULL;

PyMODINIT_FUNC
PyInit_cfloor(void)
{
    INTERN(k_type, "type");
    INTERN(k_status, "status");
    INTERN(k_headers, "headers");
    INTERN(k_body, "body");
    INTERN(k_state, "state");
    INTERN(k_request_id, "request_id");
    INTERN(k_method, "method");
    INTERN(k_path, "path");
    INTERN(v_http, "http");
    INTERN(v_start, "http.response.start");
    INTERN(v_body, "http.response.body");
    BYTES(h_content_type, "content-type");
    BYTES(h_content_length, "content-length");
    BYTES(h_request_id, "x-request-id");
    BYTES(v_json, "application/json");
    if (PyType_Ready(&DoneType) < 0 || PyType_Ready(&PairType) < 0 || PyType_Ready(&SpliceType) < 0 ||
        PyType_Ready(&CallType) < 0 || PyType_Ready(&LayerType) < 0)
        return NULL;
    if ((done = (PyObject *)PyObject_New(Done, &DoneType)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Layer", (PyObject *)&LayerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
