// The ggml backends compiled in, and the device the weights go to.
#include "model/model.h"

#include "api/error.h"

#include <stdio.h>
#include <string.h>

const char * vtrim_backends(void) {
    static char names[256];
    if (!names[0]) {
        size_t used = 0;
        for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
            const char * name = ggml_backend_reg_name(ggml_backend_reg_get(i));
            const int n = snprintf(names + used, sizeof names - used, "%s%s", used ? "," : "", name);
            if (n < 0 || (size_t) n >= sizeof names - used) {
                break;
            }
            used += (size_t) n;
        }
    }
    return names;
}

ggml_backend_dev_t vtrim_pick_device(int32_t device, int32_t * rc) {
    *rc = 0;
    if (device == VTRIM_DEVICE_CPU) {
        return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
    if (!gpu) {
        gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
    }
    if (device == VTRIM_DEVICE_GPU && !gpu) {
        // A GPU backend compiled in but no device (no driver, no card) is another fix than a CPU-only build.
        bool has_gpu_backend = false;   // a backend other than the CPU's and RPC's (which brings no device)
        for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
            const char * name = ggml_backend_reg_name(ggml_backend_reg_get(i));
            has_gpu_backend |= strcmp(name, "CPU") != 0 && strcmp(name, "RPC") != 0;
        }
        *rc = has_gpu_backend
            ? vtrim_fail(VTRIM_ERR_UNSUPPORTED, "device 'gpu' requested but no GPU found (backends: %s; is the "
                         "driver installed and a device visible?)", vtrim_backends())
            : vtrim_fail(VTRIM_ERR_UNSUPPORTED, "device 'gpu' requested but this build has no GPU backend (%s); "
                         "rebuild with VTRIM_CUDA=ON or VTRIM_METAL=ON", vtrim_backends());
        return NULL;
    }
    return gpu ? gpu : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}
