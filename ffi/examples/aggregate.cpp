// aggregate.cpp: clients and server of a federated round in C++17 with libfedcdd.
//
// Three clients mask their LoRA updates (keep half of the columns exactly, the rest become
// seeded noise) and encode them as uploads; the server checks one upload by decoding it,
// then aggregates the uploads with streaming FedCDD (every client read twice). A second
// server runs two FedAdam rounds, saving its state after the first and restoring it into a
// fresh aggregator, which must continue exactly as the original. The new global tensors are
// printed as lines
//   RESULT <rule> <tensor name> <value> <value> ...
// for the ffi tests to compare with fedcdd-core. Exit status 0 when every check passed.
//
// Build (from the repository root, after `cargo build -p fedcdd-ffi`):
//   c++ -std=c++17 -Wall -Wextra -Werror -Iffi/include ffi/examples/aggregate.cpp
//       target/debug/libfedcdd.a -lpthread -ldl -lm -o aggregate_cpp       (one line)
// or with CMake: find_package(fedcdd) and link fedcdd::fedcdd (see ffi/examples/CMakeLists.txt).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "fedcdd.h"

namespace {

// Throws with the library's explanation when a call fails.
void check(fedcdd_status status, const char *what) {
    if (status != FEDCDD_OK) {
        throw std::runtime_error(std::string(what) + ": " + fedcdd_status_name(status) + ": " +
                                 fedcdd_last_error());
    }
}

// Owning handles.
struct AggregatorFree {
    void operator()(fedcdd_aggregator *a) const { fedcdd_aggregator_free(a); }
};
struct UploadFree {
    void operator()(fedcdd_upload *u) const { fedcdd_upload_free(u); }
};
using Aggregator = std::unique_ptr<fedcdd_aggregator, AggregatorFree>;
using Upload = std::unique_ptr<fedcdd_upload, UploadFree>;

Aggregator make_aggregator(fedcdd_algorithm algorithm, fedcdd_mode mode) {
    fedcdd_config cfg;
    check(fedcdd_config_default(algorithm, &cfg), "fedcdd_config_default");
    cfg.mode = mode;
    fedcdd_aggregator *raw = nullptr;
    check(fedcdd_aggregator_new(&cfg, &raw), "fedcdd_aggregator_new");
    return Aggregator(raw);
}

// A float tensor and its description for the library.
struct Tensor {
    std::string name;
    std::vector<size_t> shape;
    std::vector<float> data;

    fedcdd_tensor view() const {
        return fedcdd_tensor{name.c_str(), shape.data(), shape.size(), FEDCDD_DTYPE_F32,
                             data.data(), data.size()};
    }
};
using Adapter = std::vector<Tensor>;

std::vector<fedcdd_tensor> views(const Adapter &adapter) {
    std::vector<fedcdd_tensor> out;
    for (const Tensor &t : adapter) out.push_back(t.view());
    return out;
}

// The examples' data (as in aggregate.c): the global adapter and client c's update.
Adapter global_adapter() {
    Adapter g{{"layers.0.q_proj.lora_A.weight", {2, 6}, {}},
              {"layers.0.q_proj.lora_B.weight", {4, 2}, {}}};
    for (size_t t = 0; t < g.size(); t++) {
        for (size_t i = 0; i < g[t].shape[0] * g[t].shape[1]; i++) {
            g[t].data.push_back(static_cast<float>(static_cast<int>((i * 5 + t * 3) % 11) - 5) /
                                16.0f);
        }
    }
    return g;
}

Adapter client_update(const Adapter &global, size_t c) {
    Adapter u = global;
    for (size_t t = 0; t < u.size(); t++) {
        for (size_t i = 0; i < u[t].data.size(); i++) {
            int k = static_cast<int>((i * (c + 2) + t * 7 + c * 3) % 13);
            u[t].data[i] = static_cast<float>(k - 6) / 32.0f * static_cast<float>(c + 1);
        }
    }
    return u;
}

constexpr uint32_t kRound = 1;
const double kSamples[3] = {10.0, 20.0, 30.0};

// Client side: the local adapter θ = G + Δ, masked and encoded.
std::vector<uint8_t> encode_upload(const Adapter &global, const Adapter &local, uint32_t id,
                                   uint64_t samples) {
    fedcdd_encode_options o;
    check(fedcdd_encode_options_default(&o), "fedcdd_encode_options_default");
    o.round = kRound;
    o.client_id = id;
    o.num_samples = samples;
    o.seed = fedcdd_default_seed(kRound, id);
    o.keep_ratio = 0.5f;
    o.noise_scale = 0.5f;
    std::vector<fedcdd_tensor> g = views(global), l = views(local);
    size_t size = 0;
    check(fedcdd_encode_upload_size(&o, g.data(), g.size(), l.data(), l.size(), &size),
          "fedcdd_encode_upload_size");
    std::vector<uint8_t> bytes(size);
    size_t written = 0;
    check(fedcdd_encode_upload(&o, g.data(), g.size(), l.data(), l.size(), bytes.data(),
                               bytes.size(), &written),
          "fedcdd_encode_upload");
    if (written != size) throw std::runtime_error("size query and written bytes differ");
    return bytes;
}

// Finalises a round and returns the new global.
Adapter finalize(fedcdd_aggregator *agg, Adapter like) {
    std::vector<fedcdd_output> outs;
    for (Tensor &t : like) {
        outs.push_back(fedcdd_output{t.name.c_str(), FEDCDD_DTYPE_F32, t.data.data(),
                                     t.data.size()});
    }
    check(fedcdd_aggregator_finalize(agg, outs.data(), outs.size()),
          "fedcdd_aggregator_finalize");
    return like;
}

void print(const char *rule, const Adapter &adapter) {
    for (const Tensor &t : adapter) {
        std::printf("RESULT %s %s", rule, t.name.c_str());
        for (float v : t.data) std::printf(" %.9g", static_cast<double>(v));
        std::printf("\n");
    }
}

// Checks the server's view of client 0's upload: header, records, and that at least the
// kept columns of every tensor came through exactly.
void inspect(const std::vector<uint8_t> &bytes, const Adapter &update) {
    fedcdd_upload *raw = nullptr;
    check(fedcdd_upload_parse(bytes.data(), bytes.size(), &raw), "fedcdd_upload_parse");
    Upload upload(raw);
    fedcdd_upload_header h;
    check(fedcdd_upload_get_header(upload.get(), &h), "fedcdd_upload_get_header");
    if (h.round != kRound || h.client_id != 0 || h.num_samples != 10 || h.num_tensors != 2) {
        throw std::runtime_error("upload header does not hold what the client wrote");
    }
    for (size_t k = 0; k < h.num_tensors; k++) {
        fedcdd_record_info info;
        check(fedcdd_upload_tensor_info(upload.get(), k, &info), "fedcdd_upload_tensor_info");
        const Tensor &want = update[k];
        if (want.name != info.name || info.numel != want.data.size() || !info.masked) {
            throw std::runtime_error("unexpected record " + std::string(info.name));
        }
        std::vector<float> got(info.numel);
        check(fedcdd_upload_decode(upload.get(), k, FEDCDD_DTYPE_F32, got.data(), got.size()),
              "fedcdd_upload_decode");
        size_t rows = want.shape[0], cols = want.shape[1], exact = 0;
        for (size_t j = 0; j < cols; j++) {
            bool same = true;
            for (size_t r = 0; r < rows; r++) same &= got[r * cols + j] == want.data[r * cols + j];
            exact += same;
        }
        std::printf("upload tensor %s: %zu of %zu columns kept, %zu exact, sigma %g\n", info.name,
                    info.kept_columns, info.columns, exact, static_cast<double>(info.sigma));
        if (exact < info.kept_columns) throw std::runtime_error("a kept column was altered");
    }
}

}  // namespace

int main() {
    try {
        std::printf("libfedcdd %s\n", fedcdd_version());
        const Adapter global = global_adapter();
        std::vector<Adapter> updates;
        std::vector<std::vector<uint8_t>> uploads;
        for (uint32_t c = 0; c < 3; c++) {
            updates.push_back(client_update(global, c));
            Adapter local = global;
            for (size_t t = 0; t < local.size(); t++) {
                for (size_t i = 0; i < local[t].data.size(); i++) {
                    local[t].data[i] += updates[c][t].data[i];
                }
            }
            uploads.push_back(
                encode_upload(global, local, c, static_cast<uint64_t>(kSamples[c])));
        }
        inspect(uploads[0], updates[0]);

        // Server: streaming FedCDD over the uploads (sample counts from their headers).
        Aggregator server = make_aggregator(FEDCDD_ALG_FEDCDD, FEDCDD_MODE_STREAMING);
        std::vector<fedcdd_tensor> g = views(global);
        check(fedcdd_aggregator_set_global(server.get(), g.data(), g.size()), "set_global");
        size_t passes = 0;
        check(fedcdd_aggregator_passes(server.get(), &passes), "passes");
        for (size_t pass = 0; pass < passes; pass++) {
            if (pass == 1) check(fedcdd_aggregator_begin_pass2(server.get()), "begin_pass2");
            for (const auto &bytes : uploads) {
                check(fedcdd_aggregator_add_upload(server.get(), bytes.data(), bytes.size(),
                                                   FEDCDD_SAMPLES_FROM_UPLOAD),
                      "fedcdd_aggregator_add_upload");
            }
        }
        print("fedcdd-upload", finalize(server.get(), global));

        // FedAdam, two rounds; the state crosses into a fresh aggregator as bytes.
        Aggregator adam = make_aggregator(FEDCDD_ALG_FEDADAM, FEDCDD_MODE_BATCH);
        check(fedcdd_aggregator_set_global(adam.get(), g.data(), g.size()), "set_global");
        auto add_all = [&](fedcdd_aggregator *agg) {
            for (uint32_t c = 0; c < 3; c++) {
                std::vector<fedcdd_tensor> u = views(updates[c]);
                check(fedcdd_aggregator_add_client(agg, c, kSamples[c], u.data(), u.size()),
                      "fedcdd_aggregator_add_client");
            }
        };
        add_all(adam.get());
        Adapter after1 = finalize(adam.get(), global);
        size_t size = 0;
        check(fedcdd_aggregator_state_size(adam.get(), &size), "state_size");
        std::vector<uint8_t> state(size);
        check(fedcdd_aggregator_save_state(adam.get(), state.data(), state.size(), &size),
              "save_state");

        Aggregator restored = make_aggregator(FEDCDD_ALG_FEDADAM, FEDCDD_MODE_BATCH);
        std::vector<fedcdd_tensor> g1 = views(after1);
        check(fedcdd_aggregator_set_global(restored.get(), g1.data(), g1.size()), "set_global");
        check(fedcdd_aggregator_load_state(restored.get(), state.data(), state.size()),
              "load_state");
        add_all(adam.get());
        add_all(restored.get());
        Adapter a2 = finalize(adam.get(), global), r2 = finalize(restored.get(), global);
        for (size_t t = 0; t < a2.size(); t++) {
            if (a2[t].data != r2[t].data) {
                throw std::runtime_error("the restored state did not continue the same way");
            }
        }
        std::printf("state of %zu bytes restored: round 2 identical\n", state.size());
        print("fedadam", a2);

        // Hostile bytes are an error, not a crash.
        state[state.size() / 2] ^= 0xFF;
        fedcdd_status s = fedcdd_aggregator_load_state(restored.get(), state.data(), state.size());
        if (s != FEDCDD_ERR_BAD_ENCODING) throw std::runtime_error("corrupt state accepted");
        std::printf("corrupt state rejected: %s\n", fedcdd_last_error());
        std::printf("OK\n");
        return 0;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
