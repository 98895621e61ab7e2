// ggml's RPC backend: decoder layers on rpc-server processes (llama.cpp's --rpc). The servers are named by
// one string, "host:port,host:port"; each server's devices take an equal share of the decoder layers, in
// the order given, and the local device keeps the last share with the embeddings, the output layer and the
// vision tower. A layer's KV cache lives with its weights, so a decode step sends each server the hidden
// state once and gets it back once, not the K and V of every token.
#include "model/model.h"

#include "api/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(VTRIM_HAS_RPC)
#include "ggml-rpc.h"
#if !defined(_WIN32)
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#endif
#endif

#define RPC_CONNECT_TIMEOUT_MS 5000

#if defined(VTRIM_HAS_RPC) && !defined(_WIN32)
// ggml's RPC client aborts the process when it cannot connect: try the endpoint first and fail with a message.
static int32_t probe(const char * host, const char * port, const char * endpoint) {
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, * res = NULL;
    const int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        return vtrim_fail(VTRIM_ERR_IO, "RPC server '%s': cannot resolve '%s': %s", endpoint, host, gai_strerror(gai));
    }
    int err = ECONNREFUSED;
    for (struct addrinfo * a = res; a; a = a->ai_next) {
        const int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
        int r = connect(fd, a->ai_addr, a->ai_addrlen);
        if (r != 0 && errno == EINPROGRESS) {
            struct pollfd pfd = { .fd = fd, .events = POLLOUT };
            socklen_t len = sizeof err;
            r = poll(&pfd, 1, RPC_CONNECT_TIMEOUT_MS) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 &&
                        err == 0 ? 0 : -1;
            if (r != 0 && err == 0) {
                err = ETIMEDOUT;
            }
        } else if (r != 0) {
            err = errno;
        }
        close(fd);
        if (r == 0) {
            freeaddrinfo(res);
            return 0;
        }
    }
    freeaddrinfo(res);
    return vtrim_fail(VTRIM_ERR_IO, "cannot connect to RPC server '%s': %s (is rpc-server running there?)", endpoint,
                      strerror(err));
}
#endif

// One "host:port" of the list: validated, reachable, and its devices appended to m->rpc_dev.
static int32_t add_server(struct vtrim_model * m, const char * endpoint) {
    const char * colon = strrchr(endpoint, ':');
    char * end = NULL;
    const long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == endpoint || !end || *end != '\0' || end == colon + 1 || port < 1 || port > 65535) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "RPC server '%s': expected host:port", endpoint);
    }
#if defined(VTRIM_HAS_RPC)
    char host[256];
    const size_t n_host = (size_t) (colon - endpoint);
    if (n_host >= sizeof host) {
        return vtrim_fail(VTRIM_ERR_INVALID_ARG, "RPC server '%s': host name too long", endpoint);
    }
    memcpy(host, endpoint, n_host);
    host[n_host] = '\0';
#if !defined(_WIN32)
    int32_t rc = probe(host, colon + 1, endpoint);
    if (rc < 0) {
        return rc;
    }
#endif
    ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);
    const size_t n_dev = reg ? ggml_backend_reg_dev_count(reg) : 0;
    if (n_dev == 0) {
        return vtrim_fail(VTRIM_ERR_BACKEND, "RPC server '%s' offers no device", endpoint);
    }
    for (size_t i = 0; i < n_dev; i++) {
        if (m->n_rpc == VTRIM_MAX_RPC) {
            return vtrim_fail(VTRIM_ERR_INVALID_ARG, "more than %d RPC devices", VTRIM_MAX_RPC);
        }
        m->rpc_dev[m->n_rpc++] = ggml_backend_reg_dev_get(reg, i);
    }
    return 0;
#else
    return vtrim_fail(VTRIM_ERR_UNSUPPORTED, "this build has no RPC backend (%s); rebuild with VTRIM_RPC=ON",
                      vtrim_backends());
#endif
}

int32_t vtrim_rpc_connect(struct vtrim_model * m, const char * servers) {
    m->n_rpc = 0;
    if (!servers || !servers[0]) {
        return 0;
    }
    const size_t len = strlen(servers);
    char * list = malloc(len + 1);
    if (!list) {
        return vtrim_fail(VTRIM_ERR_OUT_OF_MEMORY, "out of memory");
    }
    memcpy(list, servers, len + 1);
    int32_t rc = 0;
    for (char * item = list; item && rc == 0;) {
        char * comma = strchr(item, ',');
        if (comma) {
            *comma = '\0';
        }
        while (*item == ' ') {
            item++;
        }
        for (char * e = item + strlen(item); e > item && e[-1] == ' '; e--) {
            e[-1] = '\0';
        }
        rc = add_server(m, item);
        item = comma ? comma + 1 : NULL;
    }
    free(list);
    return rc;
}

ggml_backend_dev_t vtrim_layer_device(const struct vtrim_model * m, int32_t il) {
    if (m->n_rpc == 0 || il < 0 || il >= m->text.n_layer) {
        return m->dev;
    }
    const int32_t share = (int32_t) ((int64_t) il * (m->n_rpc + 1) / m->text.n_layer);
    return share < m->n_rpc ? m->rpc_dev[share] : m->dev;
}
