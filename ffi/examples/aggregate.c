/*
 * aggregate.c: a FedCDD server round in C with libfedcdd.
 *
 * Three clients send their LoRA updates (Δ = θ − G) for a two-tensor adapter; the server
 * aggregates them with FedCDD in batch mode and again in two-pass streaming mode, checks
 * that the two agree, checks the spec's property "identical clients give G + Δ", shows a
 * client with a NaN being rejected, and prints the new global tensors as lines
 *   RESULT <tensor name> <value> <value> ...
 * (the ffi tests compare them with fedcdd-core). Exit status 0 when every check passed.
 *
 * Build (from the repository root, after `cargo build -p fedcdd-ffi`):
 *   cc -std=c11 -Wall -Wextra -Werror -Iffi/include ffi/examples/aggregate.c \
 *      -Ltarget/debug -lfedcdd -Wl,-rpath,$PWD/target/debug -lm -o aggregate
 * or, once installed (ffi/install.sh PREFIX):
 *   cc -std=c11 aggregate.c $(pkg-config --cflags --libs fedcdd) -lm -o aggregate
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedcdd.h"

/* Stops with the library's explanation when a call fails. */
#define CHECK(call)                                                                    \
    do {                                                                               \
        fedcdd_status status_ = (call);                                                \
        if (status_ != FEDCDD_OK) {                                                    \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,   \
                    fedcdd_status_name(status_), fedcdd_last_error());                 \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

enum { NUM_TENSORS = 2, NUM_CLIENTS = 3, MAX_ELEMS = 12 };

static const char *const NAMES[NUM_TENSORS] = {
    "layers.0.q_proj.lora_A.weight", /* [r = 2, d_in = 6] */
    "layers.0.q_proj.lora_B.weight", /* [d_out = 4, r = 2] */
};
static const size_t SHAPES[NUM_TENSORS][2] = {{2, 6}, {4, 2}};

static float global_values[NUM_TENSORS][MAX_ELEMS];
static float updates[NUM_CLIENTS][NUM_TENSORS][MAX_ELEMS];
static const double SAMPLES[NUM_CLIENTS] = {10.0, 20.0, 30.0};

static size_t numel(int t) { return SHAPES[t][0] * SHAPES[t][1]; }

/* Deterministic test data: small dyadic rationals, exact in float (the tests and the C++
 * and Python examples generate the same). */
static void make_data(void) {
    for (int t = 0; t < NUM_TENSORS; t++) {
        for (size_t i = 0; i < numel(t); i++) {
            global_values[t][i] = (float)((int)((i * 5 + (size_t)t * 3) % 11) - 5) / 16.0f;
            for (int c = 0; c < NUM_CLIENTS; c++) {
                int k = (int)((i * (size_t)(c + 2) + (size_t)t * 7 + (size_t)c * 3) % 13);
                updates[c][t][i] = (float)(k - 6) / 32.0f * (float)(c + 1);
            }
        }
    }
}

/* Describes NUM_TENSORS float tensors to the library. */
static void describe(float values[NUM_TENSORS][MAX_ELEMS], fedcdd_tensor out[NUM_TENSORS]) {
    for (int t = 0; t < NUM_TENSORS; t++) {
        out[t].name = NAMES[t];
        out[t].shape = SHAPES[t];
        out[t].ndim = 2;
        out[t].dtype = FEDCDD_DTYPE_F32;
        out[t].data = values[t];
        out[t].len = numel(t);
    }
}

/* One FedCDD round over `clients` (NUM_CLIENTS updates) in `mode`; the new global goes to
 * `result`. */
static void fedcdd_round(fedcdd_mode mode, float clients[NUM_CLIENTS][NUM_TENSORS][MAX_ELEMS],
                         float result[NUM_TENSORS][MAX_ELEMS]) {
    fedcdd_config cfg;
    CHECK(fedcdd_config_default(FEDCDD_ALG_FEDCDD, &cfg));
    cfg.mode = mode;
    fedcdd_aggregator *agg = NULL;
    CHECK(fedcdd_aggregator_new(&cfg, &agg));

    fedcdd_tensor tensors[NUM_TENSORS];
    describe(global_values, tensors);
    CHECK(fedcdd_aggregator_set_global(agg, tensors, NUM_TENSORS));

    /* Streaming FedCDD reads every client twice: pass 1, begin_pass2, pass 2. */
    size_t passes = 0;
    CHECK(fedcdd_aggregator_passes(agg, &passes));
    for (size_t pass = 0; pass < passes; pass++) {
        if (pass == 1) {
            CHECK(fedcdd_aggregator_begin_pass2(agg));
        }
        for (int c = 0; c < NUM_CLIENTS; c++) {
            describe(clients[c], tensors);
            CHECK(fedcdd_aggregator_add_client(agg, (uint32_t)c, SAMPLES[c], tensors,
                                               NUM_TENSORS));
        }
    }

    fedcdd_output outputs[NUM_TENSORS];
    for (int t = 0; t < NUM_TENSORS; t++) {
        outputs[t].name = NAMES[t];
        outputs[t].dtype = FEDCDD_DTYPE_F32;
        outputs[t].data = result[t];
        outputs[t].len = numel(t);
    }
    CHECK(fedcdd_aggregator_finalize(agg, outputs, NUM_TENSORS));
    fedcdd_aggregator_free(agg);
}

/* Largest |a - b| / (1 + |b|). */
static float max_rel_diff(float a[NUM_TENSORS][MAX_ELEMS], float b[NUM_TENSORS][MAX_ELEMS]) {
    float worst = 0.0f;
    for (int t = 0; t < NUM_TENSORS; t++) {
        for (size_t i = 0; i < numel(t); i++) {
            float d = fabsf(a[t][i] - b[t][i]) / (1.0f + fabsf(b[t][i]));
            if (d > worst) {
                worst = d;
            }
        }
    }
    return worst;
}

int main(void) {
    printf("libfedcdd %s\n", fedcdd_version());
    make_data();

    /* 1. Batch and streaming FedCDD agree (to f32 rounding). */
    static float batch[NUM_TENSORS][MAX_ELEMS], streamed[NUM_TENSORS][MAX_ELEMS];
    fedcdd_round(FEDCDD_MODE_BATCH, updates, batch);
    fedcdd_round(FEDCDD_MODE_STREAMING, updates, streamed);
    float d = max_rel_diff(streamed, batch);
    if (!(d < 1e-5f)) {
        fprintf(stderr, "streaming and batch differ by %g\n", (double)d);
        return 1;
    }
    printf("batch vs streaming: max relative difference %g\n", (double)d);

    /* 2. Identical clients give G + delta (the spec's property 1). */
    static float same[NUM_CLIENTS][NUM_TENSORS][MAX_ELEMS], expect[NUM_TENSORS][MAX_ELEMS],
        got[NUM_TENSORS][MAX_ELEMS];
    for (int c = 0; c < NUM_CLIENTS; c++) {
        memcpy(same[c], updates[0], sizeof same[c]);
    }
    for (int t = 0; t < NUM_TENSORS; t++) {
        for (size_t i = 0; i < numel(t); i++) {
            expect[t][i] = global_values[t][i] + updates[0][t][i];
        }
    }
    fedcdd_round(FEDCDD_MODE_BATCH, same, got);
    d = max_rel_diff(got, expect);
    if (!(d < 1e-5f)) {
        fprintf(stderr, "identical clients: result differs from G + delta by %g\n", (double)d);
        return 1;
    }
    printf("identical clients give G + delta: ok\n");

    /* 3. A client holding NaN is rejected with a message naming it and the tensor. */
    fedcdd_config cfg;
    CHECK(fedcdd_config_default(FEDCDD_ALG_FEDCDD, &cfg));
    fedcdd_aggregator *agg = NULL;
    CHECK(fedcdd_aggregator_new(&cfg, &agg));
    fedcdd_tensor tensors[NUM_TENSORS];
    describe(global_values, tensors);
    CHECK(fedcdd_aggregator_set_global(agg, tensors, NUM_TENSORS));
    static float poisoned[NUM_TENSORS][MAX_ELEMS];
    memcpy(poisoned, updates[1], sizeof poisoned);
    poisoned[1][3] = NAN;
    describe(poisoned, tensors);
    fedcdd_status status = fedcdd_aggregator_add_client(agg, 9, 5.0, tensors, NUM_TENSORS);
    const char *message = fedcdd_last_error();
    if (status != FEDCDD_ERR_NON_FINITE || strstr(message, "client 9") == NULL ||
        strstr(message, NAMES[1]) == NULL) {
        fprintf(stderr, "NaN client: unexpected status %s (%s)\n", fedcdd_status_name(status),
                message);
        return 1;
    }
    printf("rejected: %s\n", message);
    size_t accepted = 99;
    CHECK(fedcdd_aggregator_num_clients(agg, &accepted));
    if (accepted != 0) {
        fprintf(stderr, "the rejected client was counted\n");
        return 1;
    }
    fedcdd_aggregator_free(agg);

    /* The batch result, for the tests to compare with fedcdd-core. */
    for (int t = 0; t < NUM_TENSORS; t++) {
        printf("RESULT %s", NAMES[t]);
        for (size_t i = 0; i < numel(t); i++) {
            printf(" %.9g", (double)batch[t][i]);
        }
        printf("\n");
    }
    printf("OK\n");
    return 0;
}
