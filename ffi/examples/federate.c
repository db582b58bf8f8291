/*
 * federate.c: a whole federation through libfedcdd's client and server API, in one C
 * program: a server and three clients of a run configuration (the keys of `fedcdd run`'s
 * config.toml), SCAFFOLD (server extras out, client state kept between rounds, control
 * changes back), two rounds. The server writes the run directory as `fedcdd run` does; the
 * test compares its adapter with `fedcdd run`'s.
 *
 * Usage: federate MODEL_DIR TRAIN.jsonl EVAL.jsonl RUN_DIR
 * Prints one "ROUND ..." line per round and "OK" when every call succeeded.
 */
#include <stdio.h>
#include <stdlib.h>

#include "fedcdd.h"

#define CLIENTS 3

static int check(fedcdd_status s, const char *what) {
    if (s != FEDCDD_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, fedcdd_status_name(s), fedcdd_last_error());
        return 0;
    }
    return 1;
}

#define CHECK(call)                                                                            \
    do {                                                                                       \
        if (!check((call), #call)) goto done;                                                  \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL_DIR TRAIN.jsonl EVAL.jsonl RUN_DIR\n", argv[0]);
        return 2;
    }
    char config[4096];
    snprintf(config, sizeof config,
             "algorithm = \"scaffold\"\nmodel = \"%s\"\ndata = \"%s\"\neval_data = \"%s\"\n"
             "threads = 1\nnum_clients = %d\nsample_clients = 2\nrounds = 2\nlocal_steps = 2\n"
             "batch = 2\nmicro_batch = 1\nseq = 32\neval_questions = 2\nlr = 0.002\n"
             "references = []\n",
             argv[1], argv[2], argv[3], CLIENTS);

    int ok = 0;
    fedcdd_server *server = NULL;
    fedcdd_client *clients[CLIENTS] = {0};
    fedcdd_tensors *states[CLIENTS] = {0};
    fedcdd_tensors *global = NULL, *extras = NULL;
    fedcdd_bytes *line = NULL;

    CHECK(fedcdd_server_new(config, argv[4], 0, &server));
    size_t done = 0, rounds = 0, n = 0;
    CHECK(fedcdd_server_counts(server, &done, &rounds, &n));
    for (size_t k = 0; k < CLIENTS; k++) {
        CHECK(fedcdd_client_new(config, k, NULL, &clients[k]));
        CHECK(fedcdd_tensors_new(&states[k]));
    }
    for (size_t r = done; r < rounds; r++) {
        size_t ids[CLIENTS], count = 0;
        CHECK(fedcdd_server_begin_round(server, (uint32_t)r, ids, CLIENTS, &count));
        CHECK(fedcdd_server_global(server, &global));
        CHECK(fedcdd_server_configure_train(server, &extras));
        for (size_t i = 0; i < count; i++) {
            size_t k = ids[i];
            fedcdd_client_result *res = NULL;
            CHECK(fedcdd_client_train_round(clients[k], (uint32_t)r, global, extras, states[k], &res));
            const uint8_t *upload = NULL;
            size_t len = 0;
            const fedcdd_tensors *sent = NULL;
            double loss = 0;
            uint64_t samples = 0;
            fedcdd_status s = fedcdd_client_result_upload(res, &upload, &len);
            if (s == FEDCDD_OK) s = fedcdd_client_result_parts(res, &sent, NULL, &loss, &samples);
            if (s == FEDCDD_OK) s = fedcdd_server_add_reply(server, k, upload, len, sent, loss);
            fedcdd_client_result_free(res);
            CHECK(s);
        }
        fedcdd_tensors_free(global);
        fedcdd_tensors_free(extras);
        global = extras = NULL;
        CHECK(fedcdd_server_finish_round(server, &line));
        const uint8_t *text = NULL;
        size_t text_len = 0;
        CHECK(fedcdd_bytes_get(line, &text, &text_len));
        printf("ROUND %.*s\n", (int)text_len, (const char *)text);
        fedcdd_bytes_free(line);
        line = NULL;
    }
    CHECK(fedcdd_server_finish(server, NULL));
    ok = 1;
    printf("OK\n");
done:
    fedcdd_bytes_free(line);
    fedcdd_tensors_free(global);
    fedcdd_tensors_free(extras);
    for (size_t k = 0; k < CLIENTS; k++) {
        fedcdd_client_free(clients[k]);
        fedcdd_tensors_free(states[k]);
    }
    fedcdd_server_free(server);
    return ok ? 0 : 1;
}
