// tadsr C API implementation: manifest + integrity checks, padding, tiling, portable noise, feather blending,
// ExecuTorch (extension Module, XNNPACK delegate) calls. Mirrors tadsr.runtime.{runner,pipeline,tiling};
// every step names the Python function it reproduces.
#include "tadsr/tadsr.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "json.hpp"
#include "sha256.hpp"

namespace fs = std::filesystem;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::EValue;

namespace {

thread_local std::string g_last_error;

struct Failure {
    tadsr_status code;
    std::string message;
};

[[noreturn]] void fail(tadsr_status code, const std::string& message) { throw Failure{code, message}; }

// ------------------------------------------------------------------------------------------------ noise

constexpr const char* kNoiseAlgorithm = "philox4x32-10-boxmuller";
constexpr int kNoiseVersion = 1;

// Philox4x32-10 (Random123), as tadsr.runtime.tiling.philox4x32_10
inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
        const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
        const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
        const uint32_t n1 = uint32_t(p1);
        const uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
        const uint32_t n3 = uint32_t(p0);
        c[0] = n0;
        c[1] = n1;
        c[2] = n2;
        c[3] = n3;
    }
}

// one standard normal of the field: counter (x, y, c, 0), key (seed lo, seed hi), Box-Muller on w0, w1
inline float noise_at(uint64_t seed, uint32_t c, uint32_t y, uint32_t x) {
    uint32_t ctr[4] = {x, y, c, 0u};
    philox4x32_10(ctr, uint32_t(seed), uint32_t(seed >> 32));
    const double u0 = (double(ctr[0]) + 0.5) * 0x1p-32;
    const double u1 = (double(ctr[1]) + 0.5) * 0x1p-32;
    double z = std::sqrt(-2.0 * std::log(u0));
    z *= std::cos((2.0 * M_PI) * u1);
    return static_cast<float>(z);
}

void noise_window(uint64_t seed, int channels, int h, int w, uint64_t y0, uint64_t x0, float* out) {
    if (y0 + uint64_t(h) > (uint64_t(1) << 32) || x0 + uint64_t(w) > (uint64_t(1) << 32))
        fail(TADSR_ERR_ARGUMENT, "noise window beyond the uint32 counter range");
    for (int c = 0; c < channels; ++c)
        for (int i = 0; i < h; ++i)
            for (int j = 0; j < w; ++j)
                *out++ = noise_at(seed, uint32_t(c), uint32_t(y0 + i), uint32_t(x0 + j));
}

// ------------------------------------------------------------------------------------------- manifest

struct TensorSpec {
    std::string name;
    std::vector<int64_t> shape;
};

struct Graph {
    fs::path dir;
    std::string name;
    std::string precision;
    int tile = 0;
    int scale = 0;
    std::vector<TensorSpec> inputs, outputs;
    double prior_noise_scale = std::numeric_limits<double>::quiet_NaN();
    std::unique_ptr<Module> module;

    const TensorSpec& input(const std::string& n) const {
        for (const auto& t : inputs)
            if (t.name == n) return t;
        fail(TADSR_ERR_SPEC, (dir / "manifest.json").string() + ": graph " + name + " has no input '" + n + "'");
    }
    const TensorSpec& output(const std::string& n) const {
        for (const auto& t : outputs)
            if (t.name == n) return t;
        fail(TADSR_ERR_SPEC, (dir / "manifest.json").string() + ": graph " + name + " has no output '" + n + "'");
    }
};

std::string shape_str(const std::vector<int64_t>& s) {
    std::ostringstream o;
    o << "(";
    for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
    o << (s.size() == 1 ? ",)" : ")");
    return o.str();
}

const tadsr::json::Value& need(const tadsr::json::Value& obj, const std::string& key, const fs::path& where) {
    const auto* v = obj.get(key);
    if (!v) fail(TADSR_ERR_MANIFEST, where.string() + " lacks '" + key + "'; re-export the artifact");
    return *v;
}

int64_t need_int(const tadsr::json::Value& v, const std::string& what, const fs::path& where) {
    if (!v.is_number() || v.number != std::floor(v.number) || std::fabs(v.number) > 1e15)
        fail(TADSR_ERR_MANIFEST, where.string() + ": " + what + " must be an integer");
    return static_cast<int64_t>(v.number);
}

const std::string& need_str(const tadsr::json::Value& v, const std::string& what, const fs::path& where) {
    if (!v.is_string()) fail(TADSR_ERR_MANIFEST, where.string() + ": " + what + " must be a string");
    return v.string;
}

// tadsr.runtime.runner.read_manifest + the executorch format and noise checks
tadsr::json::Value read_manifest(const fs::path& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
        fail(TADSR_ERR_IO, "artifact folder " + dir.string() + " does not exist; pass the folder tadsr export wrote");
    const fs::path path = dir / "manifest.json";
    if (!fs::is_regular_file(path, ec))
        fail(TADSR_ERR_IO,
             dir.string() + " has no manifest.json; it is not an artifact folder written by tadsr export");
    std::ifstream in(path, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    if (!in.good() && !in.eof()) fail(TADSR_ERR_IO, "cannot read " + path.string());
    tadsr::json::Value m;
    try {
        m = tadsr::json::parse(buf.str());
    } catch (const std::runtime_error& e) {
        fail(TADSR_ERR_MANIFEST, path.string() + " is not readable JSON (" + e.what() + "); re-export the artifact");
    }
    if (!m.is_object()) fail(TADSR_ERR_MANIFEST, path.string() + " is not a JSON object");
    const auto* schema = m.get("schema");
    if (!schema || !schema->is_number() || schema->number != 1.0)
        fail(TADSR_ERR_MANIFEST, path.string() + ": manifest schema is not 1; re-export with this tadsr version");
    for (const char* k : {"graph", "format", "precision", "files"}) need(m, k, path);
    const std::string& fmt = need_str(need(m, "format", path), "format", path);
    if (fmt != "executorch")
        fail(TADSR_ERR_MANIFEST, path.string() + " is a '" + fmt +
                                     "' artifact; this runner runs ExecuTorch (.pte) artifacts only");
    if (const auto* noise = m.get("noise"); noise && !noise->is_null()) {
        const auto* algo = noise->get("algorithm");
        const auto* ver = noise->get("version");
        if (!algo || !algo->is_string() || algo->string != kNoiseAlgorithm || !ver || !ver->is_number() ||
            ver->number != kNoiseVersion)
            fail(TADSR_ERR_MANIFEST, path.string() + " asks for a noise generator other than " + kNoiseAlgorithm +
                                         " version 1; upgrade the runner or re-export the artifact");
    }
    return m;
}

// tadsr.runtime.runner.sha256_path: a file's sha256, or a folder's digest of "<rel posix>\0<sha256>\n" lines
std::string digest_path(const fs::path& p) {
    std::error_code ec;
    std::string hex;
    if (fs::is_directory(p, ec)) {
        std::vector<std::pair<std::string, fs::path>> files;
        for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::recursive_directory_iterator();
             it.increment(ec))
            if (it->is_regular_file()) files.emplace_back(fs::relative(it->path(), p).generic_string(), it->path());
        std::sort(files.begin(), files.end());
        tadsr::Sha256 h;
        for (const auto& [rel, full] : files) {
            std::string d;
            if (!tadsr::Sha256::file(full.string(), &d)) fail(TADSR_ERR_IO, "cannot read model file " + full.string());
            std::string line = rel + std::string(1, '\0') + d + "\n";
            h.update(line.data(), line.size());
        }
        return h.hex();
    }
    if (!tadsr::Sha256::file(p.string(), &hex)) fail(TADSR_ERR_IO, "cannot read model file " + p.string());
    return hex;
}

// tadsr.runtime.runner.verify_files; returns the first file (the program)
fs::path verify_files(const fs::path& dir, const tadsr::json::Value& m) {
    const fs::path mpath = dir / "manifest.json";
    const auto& files = m.get("files");
    if (!files->is_array() || files->array.empty()) fail(TADSR_ERR_MANIFEST, mpath.string() + " lists no model files");
    fs::path first;
    for (const auto& entry : files->array) {
        const std::string& name = need_str(need(entry, "name", mpath), "files[].name", mpath);
        const std::string& want = need_str(need(entry, "sha256", mpath), "files[].sha256", mpath);
        const fs::path rel(name);
        bool escapes = rel.is_absolute();
        for (const auto& part : rel) escapes = escapes || part == "..";
        if (escapes) fail(TADSR_ERR_MANIFEST, mpath.string() + " lists '" + name + "', which is outside the folder");
        const fs::path path = dir / rel;
        std::error_code ec;
        if (!fs::exists(path, ec))
            fail(TADSR_ERR_IO,
                 "model file " + path.string() + " listed in the manifest is missing; restore it or re-export");
        const std::string got = digest_path(path);
        if (got != want)
            fail(TADSR_ERR_INTEGRITY, "model file " + path.string() + " does not match its manifest (sha256 " +
                                          got.substr(0, 16) + "..., manifest says " + want.substr(0, 16) +
                                          "...): it was modified or truncated after export; re-export the artifact");
        if (first.empty()) first = path;
    }
    return first;
}

std::vector<TensorSpec> tensor_specs(const tadsr::json::Value& list, const char* what, const fs::path& mpath) {
    if (!list.is_array()) fail(TADSR_ERR_MANIFEST, mpath.string() + ": graph." + what + " must be a list");
    std::vector<TensorSpec> out;
    for (const auto& d : list.array) {
        TensorSpec t;
        t.name = need_str(need(d, "name", mpath), std::string(what) + "[].name", mpath);
        const auto& shape = need(d, "shape", mpath);
        if (!shape.is_array()) fail(TADSR_ERR_MANIFEST, mpath.string() + ": shape of " + t.name + " is not a list");
        for (const auto& s : shape.array) {
            const int64_t v = need_int(s, "a shape entry", mpath);
            if (v < 1 || v > (1 << 20)) fail(TADSR_ERR_MANIFEST, mpath.string() + ": bad shape of " + t.name);
            t.shape.push_back(v);
        }
        if (const auto* dt = d.get("dtype"); dt && !(dt->is_string() && dt->string == "float32"))
            fail(TADSR_ERR_MANIFEST, mpath.string() + ": " + t.name + " is not float32; this runner feeds float32");
        out.push_back(std::move(t));
    }
    return out;
}

const char* error_name(executorch::runtime::Error e) {
    switch (e) {
        case executorch::runtime::Error::Ok: return "Ok";
        case executorch::runtime::Error::InvalidArgument: return "InvalidArgument";
        case executorch::runtime::Error::InvalidProgram: return "InvalidProgram";
        case executorch::runtime::Error::NotFound: return "NotFound";
        case executorch::runtime::Error::NotSupported: return "NotSupported";
        case executorch::runtime::Error::MemoryAllocationFailed: return "MemoryAllocationFailed";
        case executorch::runtime::Error::AccessFailed: return "AccessFailed";
        case executorch::runtime::Error::DelegateInvalidCompatibility: return "DelegateInvalidCompatibility";
        case executorch::runtime::Error::OperatorMissing: return "OperatorMissing";
        default: return "error";
    }
}

std::string et_error(executorch::runtime::Error e) {
    return std::string(error_name(e)) + " (ExecuTorch error 0x" +
           [&] { std::ostringstream o; o << std::hex << static_cast<int>(e); return o.str(); }() + ")";
}

// read, verify, parse and load one artifact; checks the program's inputs/outputs against the manifest
std::unique_ptr<Graph> open_graph(const fs::path& dir, const tadsr::json::Value& m) {
    const fs::path mpath = dir / "manifest.json";
    auto g = std::make_unique<Graph>();
    g->dir = dir;
    const fs::path program = verify_files(dir, m);
    const auto& graph = need(m, "graph", mpath);
    g->name = need_str(need(graph, "name", mpath), "graph.name", mpath);
    g->precision = need_str(need(m, "precision", mpath), "precision", mpath);
    g->tile = static_cast<int>(need_int(need(graph, "tile", mpath), "graph.tile", mpath));
    g->scale = static_cast<int>(need_int(need(graph, "scale", mpath), "graph.scale", mpath));
    if (g->tile < 1 || g->tile > 4096 || g->scale < 1 || g->scale > 16)
        fail(TADSR_ERR_MANIFEST, mpath.string() + ": graph.tile / graph.scale out of range");
    g->inputs = tensor_specs(need(graph, "inputs", mpath), "inputs", mpath);
    g->outputs = tensor_specs(need(graph, "outputs", mpath), "outputs", mpath);
    if (const auto* consts = graph.get("constants"); consts && consts->get("prior_noise_scale")) {
        const auto* s = consts->get("prior_noise_scale");
        if (!s->is_number()) fail(TADSR_ERR_MANIFEST, mpath.string() + ": prior_noise_scale is not a number");
        g->prior_noise_scale = s->number;
    }
    for (const auto& t : g->inputs)
        if (t.shape.empty() || t.shape[0] != 1)
            fail(TADSR_ERR_SPEC, mpath.string() + ": input " + t.name + " has batch " +
                                     (t.shape.empty() ? std::string("none") : std::to_string(t.shape[0])) +
                                     "; this runner feeds one tile per call (export with batch 1)");

    g->module = std::make_unique<Module>(program.string(), Module::LoadMode::Mmap);
    const auto err = g->module->load_forward();
    if (err != executorch::runtime::Error::Ok)
        fail(TADSR_ERR_RUNTIME, "ExecuTorch cannot load " + program.string() + ": " + et_error(err) +
                                    " (a delegate this build lacks, e.g. Core ML off Apple, or a corrupt program)");
    auto meta = g->module->method_meta("forward");
    if (!meta.ok()) fail(TADSR_ERR_RUNTIME, "no forward method in " + program.string() + ": " + et_error(meta.error()));
    auto check = [&](bool input, const std::vector<TensorSpec>& specs) {
        const size_t n = input ? meta->num_inputs() : meta->num_outputs();
        if (n != specs.size())
            fail(TADSR_ERR_SPEC, program.string() + " takes " + std::to_string(n) + (input ? " inputs" : " outputs") +
                                     ", its manifest lists " + std::to_string(specs.size()) + "; re-export");
        for (size_t i = 0; i < n; ++i) {
            auto info = input ? meta->input_tensor_meta(i) : meta->output_tensor_meta(i);
            if (!info.ok())
                fail(TADSR_ERR_SPEC, program.string() + ": argument " + std::to_string(i) + " is not a tensor");
            std::vector<int64_t> sizes(info->sizes().begin(), info->sizes().end());
            if (sizes != specs[i].shape || info->scalar_type() != executorch::aten::ScalarType::Float)
                fail(TADSR_ERR_SPEC, program.string() + ": " + (input ? "input " : "output ") + specs[i].name +
                                         " is " + shape_str(sizes) + " in the program but " +
                                         shape_str(specs[i].shape) + " float32 in the manifest; re-export");
        }
    };
    check(true, g->inputs);
    check(false, g->outputs);
    return g;
}

// run one program on float32 buffers given in its manifest input order; returns the single output
void run_graph(Graph& g, const std::vector<const float*>& feeds, std::vector<float>& out) {
    std::vector<executorch::extension::TensorPtr> tensors;
    std::vector<EValue> values;
    for (size_t i = 0; i < g.inputs.size(); ++i) {
        std::vector<executorch::aten::SizesType> sizes(g.inputs[i].shape.begin(), g.inputs[i].shape.end());
        tensors.push_back(from_blob(const_cast<float*>(feeds[i]), sizes, executorch::aten::ScalarType::Float));
        values.emplace_back(*tensors.back());
    }
    auto result = g.module->forward(values);
    if (!result.ok()) fail(TADSR_ERR_RUNTIME, "ExecuTorch failed to run " + g.name + ": " + et_error(result.error()));
    if (result->empty() || !(*result)[0].isTensor())
        fail(TADSR_ERR_SPEC, g.name + " returned no tensor output");
    const auto& t = (*result)[0].toTensor();
    size_t want = 1;
    for (int64_t s : g.outputs[0].shape) want *= size_t(s);
    if (t.scalar_type() != executorch::aten::ScalarType::Float || size_t(t.numel()) != want)
        fail(TADSR_ERR_SPEC, g.name + " returned " + std::to_string(t.numel()) + " values, expected " +
                                 shape_str(g.outputs[0].shape) + " float32");
    out.assign(t.const_data_ptr<float>(), t.const_data_ptr<float>() + want);
}

// ----------------------------------------------------------------------------------------------- tiling

// tadsr.runtime.tiling.tile_starts
std::vector<int> tile_starts(int length, int tile, int overlap) {
    std::vector<int> starts;
    for (int s = 0; s < length; s += tile - overlap) {
        const int start = std::min(s, length - tile);
        if (starts.empty() || start != starts.back()) starts.push_back(start);
    }
    return starts;
}

// tadsr.runtime.tiling.axis_weights (float64 windows)
std::vector<std::vector<double>> axis_weights(size_t count, int size, int ramp, bool feather) {
    std::vector<double> rise(std::max(ramp, 0));
    for (int i = 0; i < ramp; ++i) rise[i] = 0.5 - 0.5 * std::cos(M_PI * (i + 0.5) / ramp);
    std::vector<std::vector<double>> out;
    for (size_t i = 0; i < count; ++i) {
        std::vector<double> w(size, 1.0);
        if (feather && ramp > 0) {
            if (i > 0)
                for (int k = 0; k < ramp; ++k) w[k] *= rise[k];
            if (i + 1 < count)
                for (int k = 0; k < ramp; ++k) w[size - ramp + k] *= rise[ramp - 1 - k];
        }
        out.push_back(std::move(w));
    }
    return out;
}

// tadsr.runtime.tiling._normaliser, cast to float32
std::vector<float> normaliser(const std::vector<int>& starts, const std::vector<std::vector<double>>& windows,
                              int scale, int out_len) {
    const int len = std::max(out_len, starts.back() * scale + int(windows.back().size()));
    std::vector<double> total(len, 0.0);
    for (size_t k = 0; k < starts.size(); ++k)
        for (size_t i = 0; i < windows[k].size(); ++i) total[starts[k] * scale + i] += windows[k][i];
    return std::vector<float>(total.begin(), total.begin() + out_len);
}

// numpy.pad(mode="reflect") source index for position i of a side of length n (periodic reflection)
inline int reflect(int i, int n) {
    if (n == 1) return 0;
    const int period = 2 * (n - 1);
    i %= period;
    return i < n ? i : period - i;
}

inline int ceil_to(int n, int m) { return (n + m - 1) / m * m; }

}  // namespace

// -------------------------------------------------------------------------------------------------- runner

struct tadsr_runner {
    std::map<std::string, std::unique_ptr<Graph>> graphs;
    bool fused = false;
    int tile = 0;
    int scale = 0;
    std::string precision;
    std::vector<int64_t> noise_shape;  // (C, h, w)
    float noise_scale = 0.0f;          // components: x_t = z_y + noise_scale * noise
    tadsr_options options{16, 0};
};

namespace {

// (precision/tile key, graph name) of an ExecuTorch artifact folder; ("", "") for another format
std::pair<std::string, std::string> read_manifest_any(const fs::path& dir) {
    const fs::path mpath = dir / "manifest.json";
    std::ifstream in(mpath, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    try {
        const auto peek = tadsr::json::parse(buf.str());
        const auto* fmt = peek.get("format");
        if (fmt && fmt->is_string() && fmt->string != "executorch") return {"", ""};
    } catch (const std::runtime_error&) {
        // read_manifest below reports it
    }
    const auto m = read_manifest(dir);
    const auto& graph = need(m, "graph", mpath);
    const std::string key = need_str(need(m, "precision", mpath), "precision", mpath) + "/t" +
                            std::to_string(need_int(need(graph, "tile", mpath), "graph.tile", mpath));
    return {key, need_str(need(graph, "name", mpath), "graph.name", mpath)};
}

// tadsr.runtime.pipeline.find_artifacts, for ExecuTorch artifacts
std::map<std::string, fs::path> find_artifacts(const fs::path& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) fail(TADSR_ERR_IO, "artifact folder " + dir.string() + " does not exist");
    if (fs::exists(dir / "manifest.json", ec)) {
        const auto m = read_manifest(dir);
        const auto* name = m.get("graph")->get("name");
        const std::string graph = name && name->is_string() ? name->string : "?";
        if (graph != "pipeline")
            fail(TADSR_ERR_MANIFEST, dir.string() + " holds only the '" + graph +
                                         "' graph; pass the fused 'pipeline' artifact, or the parent folder that "
                                         "holds the encoder, denoiser and decoder artifacts");
        return {{"pipeline", dir}};
    }
    std::vector<fs::path> subs;
    for (const auto& e : fs::directory_iterator(dir, ec))
        if (e.is_directory() && fs::exists(e.path() / "manifest.json")) subs.push_back(e.path());
    std::sort(subs.begin(), subs.end());
    std::map<std::string, std::map<std::string, fs::path>> sets;  // "precision/tile" -> graph -> dir
    std::string found;
    for (const auto& sub : subs) {
        const auto m = read_manifest_any(sub);
        if (m.first.empty()) continue;  // another format
        sets[m.first][m.second] = sub;
        found += (found.empty() ? "" : ", ") + sub.filename().string();
    }
    std::map<std::string, fs::path> chosen;
    int full = 0;
    for (const auto& [key, graphs] : sets) {
        const bool has_components = graphs.count("encoder") && graphs.count("denoiser") && graphs.count("decoder");
        if (!graphs.count("pipeline") && !has_components) continue;
        ++full;
        if (graphs.count("pipeline")) chosen = {{"pipeline", graphs.at("pipeline")}};
        else chosen = {{"encoder", graphs.at("encoder")}, {"denoiser", graphs.at("denoiser")},
                       {"decoder", graphs.at("decoder")}};
    }
    if (full == 0)
        fail(TADSR_ERR_MANIFEST, "no runnable ExecuTorch artifact set in " + dir.string() +
                                     ": need a 'pipeline' artifact or all of encoder/denoiser/decoder; found: " +
                                     (found.empty() ? "none" : found));
    if (full > 1)
        fail(TADSR_ERR_ARGUMENT, "several ExecuTorch artifact sets (precision/tile) in " + dir.string() +
                                     "; pass the folder of one artifact or of one set");
    return chosen;
}

}  // namespace

namespace {

void check_graph_io(const tadsr_runner& r) {
    auto shape_is = [](const TensorSpec& t, std::vector<int64_t> want) { return t.shape == want; };
    const int64_t t = r.tile, st = int64_t(r.tile) * r.scale;
    const std::vector<int64_t> lr{1, 3, t, t}, sr{1, 3, st, st};
    for (const auto& [name, g] : r.graphs) {
        const std::string where = (g->dir / "manifest.json").string();
        if (g->tile != r.tile || g->scale != r.scale)
            fail(TADSR_ERR_SPEC, "artifacts have different tiles/scales: " + where);
        if (g->name != name)
            fail(TADSR_ERR_MANIFEST, where + " holds graph '" + g->name + "', expected '" + name + "'");
        if (g->outputs.size() != 1)
            fail(TADSR_ERR_SPEC, where + ": graph " + name + " has " + std::to_string(g->outputs.size()) +
                                     " outputs, expected 1");
    }
    auto expect = [&](const Graph& g, const TensorSpec& s, const std::vector<int64_t>& want) {
        if (!shape_is(s, want))
            fail(TADSR_ERR_SPEC, (g.dir / "manifest.json").string() + ": " + s.name + " is " + shape_str(s.shape) +
                                     ", expected " + shape_str(want));
    };
    if (r.fused) {
        const Graph& p = *r.graphs.at("pipeline");
        if (p.inputs.size() != 2) fail(TADSR_ERR_SPEC, "the pipeline graph must take lr and noise");
        expect(p, p.input("lr"), lr);
        expect(p, p.output("sr"), sr);
        const auto& n = p.input("noise");
        if (n.shape.size() != 4) fail(TADSR_ERR_SPEC, "the pipeline's noise input must be (1, C, h, w)");
    } else {
        const Graph& e = *r.graphs.at("encoder");
        const Graph& d = *r.graphs.at("denoiser");
        const Graph& c = *r.graphs.at("decoder");
        if (e.inputs.size() != 1 || d.inputs.size() != 2 || c.inputs.size() != 1)
            fail(TADSR_ERR_SPEC, "component graphs must take (lr), (x_t, lr), (x0)");
        expect(e, e.input("lr"), lr);
        expect(d, d.input("lr"), lr);
        expect(c, c.output("sr"), sr);
        const auto& xt = d.input("x_t");
        if (xt.shape.size() != 4) fail(TADSR_ERR_SPEC, "the denoiser's x_t input must be (1, C, h, w)");
        expect(e, e.output("z_y"), xt.shape);
        expect(c, c.input("x0"), d.output("x0").shape);
        if (std::isnan(d.prior_noise_scale))
            fail(TADSR_ERR_MANIFEST, (d.dir / "manifest.json").string() +
                                         " lacks the 'prior_noise_scale' constant (re-export it)");
    }
}

// run_tiles of MobileSRPipeline for one tile: lr (3,t,t) + noise (C,h,w) -> sr (3,st,st)
void run_tile(tadsr_runner& r, const float* lr, const float* noise, std::vector<float>& sr) {
    if (r.fused) {
        Graph& p = *r.graphs.at("pipeline");
        std::vector<const float*> feeds;
        for (const auto& in : p.inputs) feeds.push_back(in.name == "lr" ? lr : noise);
        run_graph(p, feeds, sr);
        return;
    }
    Graph& e = *r.graphs.at("encoder");
    Graph& d = *r.graphs.at("denoiser");
    Graph& c = *r.graphs.at("decoder");
    std::vector<float> z, x0;
    run_graph(e, {lr}, z);
    for (size_t i = 0; i < z.size(); ++i) z[i] = z[i] + r.noise_scale * noise[i];  // float32, as numpy
    std::vector<const float*> feeds;
    for (const auto& in : d.inputs) feeds.push_back(in.name == "lr" ? lr : z.data());
    run_graph(d, feeds, x0);
    run_graph(c, {x0.data()}, sr);
}

// tadsr.runtime.tiling.upscale_tiled on planar float32 (3, h, w) -> (3, h*s, w*s)
void upscale(tadsr_runner& r, const float* in, int width, int height, uint64_t seed, std::vector<float>& canvas) {
    const int tile = r.tile, scale = r.scale;
    const int overlap = std::max(0, std::min(r.options.overlap, tile - 1));
    const int ph = ceil_to(std::max(height, tile), 64), pw = ceil_to(std::max(width, tile), 64);
    // reflect-pad bottom/right (pad_for_tiles)
    std::vector<int> ry(ph), rx(pw);
    for (int i = 0; i < ph; ++i) ry[i] = reflect(i, height);
    for (int j = 0; j < pw; ++j) rx[j] = reflect(j, width);
    const std::vector<int> ys = tile_starts(ph, tile, overlap), xs = tile_starts(pw, tile, overlap);
    const int size = tile * scale;
    const int64_t out_h = int64_t(height) * scale, out_w = int64_t(width) * scale;
    const bool feather = r.options.blend == 0;
    const auto wy = axis_weights(ys.size(), size, overlap * scale, feather);
    const auto wx = axis_weights(xs.size(), size, overlap * scale, feather);
    const int nc = int(r.noise_shape[0]), nh = int(r.noise_shape[1]), nw = int(r.noise_shape[2]);
    for (int y : ys)
        if ((int64_t(y) * nh) % tile) fail(TADSR_ERR_SPEC, "tile origins do not fall on the latent grid");
    for (int x : xs)
        if ((int64_t(x) * nw) % tile) fail(TADSR_ERR_SPEC, "tile origins do not fall on the latent grid");
    canvas.assign(size_t(3) * out_h * out_w, 0.0f);
    std::vector<float> lr(size_t(3) * tile * tile), noise(size_t(nc) * nh * nw), sr, weight;
    for (size_t iy = 0; iy < ys.size(); ++iy) {
        if (ys[iy] >= height) continue;  // wholly in the padding
        for (size_t ix = 0; ix < xs.size(); ++ix) {
            if (xs[ix] >= width) continue;
            const int y0 = ys[iy], x0 = xs[ix];
            for (int c = 0; c < 3; ++c)
                for (int i = 0; i < tile; ++i) {
                    const float* row = in + (size_t(c) * height + ry[y0 + i]) * width;
                    float* dst = &lr[(size_t(c) * tile + i) * tile];
                    for (int j = 0; j < tile; ++j) dst[j] = row[rx[x0 + j]];
                }
            noise_window(seed, nc, nh, nw, uint64_t(y0) * nh / tile, uint64_t(x0) * nw / tile, noise.data());
            run_tile(r, lr.data(), noise.data(), sr);
            // _accumulate: clip, weight (float64 outer product cast to float32), crop to the canvas
            const int64_t oy = int64_t(y0) * scale, ox = int64_t(x0) * scale;
            const int h = int(std::min<int64_t>(size, out_h - oy)), w = int(std::min<int64_t>(size, out_w - ox));
            for (int c = 0; c < 3; ++c)
                for (int i = 0; i < h; ++i) {
                    const float* src = &sr[(size_t(c) * size + i) * size];
                    float* dst = &canvas[(size_t(c) * out_h + oy + i) * out_w + ox];
                    for (int j = 0; j < w; ++j) {
                        const float v = std::min(1.0f, std::max(-1.0f, src[j]));
                        dst[j] += v * static_cast<float>(wy[iy][i] * wx[ix][j]);
                    }
                }
        }
    }
    const auto ny = normaliser(ys, wy, scale, int(out_h)), nx = normaliser(xs, wx, scale, int(out_w));
    for (int c = 0; c < 3; ++c)
        for (int64_t i = 0; i < out_h; ++i) {
            float* row = &canvas[(size_t(c) * out_h + i) * out_w];
            for (int64_t j = 0; j < out_w; ++j) {
                float v = row[j] / ny[i];
                v = v / nx[j];
                row[j] = std::min(1.0f, std::max(-1.0f, v));
            }
        }
}

void check_image_args(const tadsr_runner* r, const void* in, int width, int height, const void* out,
                      size_t capacity, size_t* needed) {
    if (!r) fail(TADSR_ERR_ARGUMENT, "runner is NULL");
    if (!in || !out) fail(TADSR_ERR_ARGUMENT, "input or output buffer is NULL");
    if (width < 1 || height < 1)
        fail(TADSR_ERR_ARGUMENT, "image has zero size (" + std::to_string(width) + "x" + std::to_string(height) +
                                     "); width and height must be >= 1");
    const int64_t out_px = int64_t(width) * r->scale * int64_t(height) * r->scale;
    if (int64_t(width) * r->scale > (1 << 20) || int64_t(height) * r->scale > (1 << 20) || out_px > (int64_t(1) << 31))
        fail(TADSR_ERR_ARGUMENT, "image " + std::to_string(width) + "x" + std::to_string(height) +
                                     " is too large (output above 2^31 pixels or 2^20 per side)");
    *needed = size_t(out_px) * 3;
    if (capacity < *needed)
        fail(TADSR_ERR_ARGUMENT, "output buffer holds " + std::to_string(capacity) + " values, needs " +
                                     std::to_string(*needed) + " (3 x " + std::to_string(width * r->scale) + " x " +
                                     std::to_string(height * r->scale) + ")");
}

template <typename F>
tadsr_status guarded(F&& body) {
    try {
        body();
        g_last_error.clear();
        return TADSR_OK;
    } catch (const Failure& f) {
        g_last_error = f.message;
        return f.code;
    } catch (const std::bad_alloc&) {
        g_last_error = "out of memory";
        return TADSR_ERR_MEMORY;
    } catch (const std::exception& e) {
        g_last_error = std::string("unexpected error: ") + e.what();
        return TADSR_ERR_RUNTIME;
    } catch (...) {
        g_last_error = "unexpected error";
        return TADSR_ERR_RUNTIME;
    }
}

}  // namespace

extern "C" {

void tadsr_options_default(tadsr_options* options) {
    if (options) *options = tadsr_options{16, 0};
}

tadsr_status tadsr_runner_create(const char* artifact_dir, const tadsr_options* options, tadsr_runner** out) {
    return guarded([&] {
        if (!out) fail(TADSR_ERR_ARGUMENT, "out is NULL");
        *out = nullptr;
        if (!artifact_dir || !*artifact_dir) fail(TADSR_ERR_ARGUMENT, "artifact_dir is NULL or empty");
        auto r = std::make_unique<tadsr_runner>();
        if (options) {
            if (options->overlap < 0) fail(TADSR_ERR_ARGUMENT, "overlap must be >= 0");
            if (options->blend != 0 && options->blend != 1) fail(TADSR_ERR_ARGUMENT, "blend must be 0 or 1");
            r->options = *options;
        }
        for (const auto& [name, dir] : find_artifacts(fs::path(artifact_dir)))
            r->graphs[name] = open_graph(dir, read_manifest(dir));
        r->fused = r->graphs.count("pipeline") > 0;
        const Graph& first = *r->graphs.begin()->second;
        r->tile = first.tile;
        r->scale = first.scale;
        r->precision = first.precision;
        check_graph_io(*r);
        if (r->fused) {
            const auto& n = r->graphs.at("pipeline")->input("noise").shape;
            r->noise_shape.assign(n.begin() + 1, n.end());
        } else {
            const auto& n = r->graphs.at("denoiser")->input("x_t").shape;
            r->noise_shape.assign(n.begin() + 1, n.end());
            r->noise_scale = static_cast<float>(r->graphs.at("denoiser")->prior_noise_scale);
        }
        *out = r.release();
    });
}

void tadsr_runner_free(tadsr_runner* runner) { delete runner; }

int tadsr_runner_tile(const tadsr_runner* r) { return r ? r->tile : 0; }
int tadsr_runner_scale(const tadsr_runner* r) { return r ? r->scale : 0; }
int tadsr_runner_fused(const tadsr_runner* r) { return r ? int(r->fused) : 0; }
const char* tadsr_runner_precision(const tadsr_runner* r) { return r ? r->precision.c_str() : ""; }

tadsr_status tadsr_upscale_f32(tadsr_runner* r, const float* in, int width, int height, uint64_t seed, float* out,
                               size_t out_capacity) {
    return guarded([&] {
        size_t needed = 0;
        check_image_args(r, in, width, height, out, out_capacity, &needed);
        std::vector<float> canvas;
        upscale(*r, in, width, height, seed, canvas);
        std::memcpy(out, canvas.data(), needed * sizeof(float));
    });
}

tadsr_status tadsr_upscale_rgb8(tadsr_runner* r, const uint8_t* rgb, int width, int height, uint64_t seed,
                                uint8_t* out, size_t out_capacity) {
    return guarded([&] {
        size_t needed = 0;
        check_image_args(r, rgb, width, height, out, out_capacity, &needed);
        const size_t n = size_t(width) * height;
        std::vector<float> planar(3 * n);
        for (size_t p = 0; p < n; ++p)
            for (int c = 0; c < 3; ++c)  // imageio: v / 255 (float32), to_model: (x - 0.5) / 0.5
                planar[c * n + p] = (float(rgb[3 * p + c]) / 255.0f - 0.5f) / 0.5f;
        std::vector<float> canvas;
        upscale(*r, planar.data(), width, height, seed, canvas);
        const size_t m = needed / 3;
        for (size_t p = 0; p < m; ++p)
            for (int c = 0; c < 3; ++c) {  // from_model + write_png: clamp, x * 0.5 + 0.5, clamp, * 255, round
                float v = std::min(1.0f, std::max(-1.0f, canvas[c * m + p])) * 0.5f + 0.5f;
                v = std::min(1.0f, std::max(0.0f, v));
                out[3 * p + c] = static_cast<uint8_t>(std::nearbyint(v * 255.0f));
            }
    });
}

tadsr_status tadsr_noise(uint64_t seed, int channels, int h, int w, uint32_t y0, uint32_t x0, float* out,
                         size_t out_capacity) {
    return guarded([&] {
        if (!out) fail(TADSR_ERR_ARGUMENT, "out is NULL");
        if (channels < 0 || h < 0 || w < 0) fail(TADSR_ERR_ARGUMENT, "negative noise shape");
        const size_t needed = size_t(channels) * size_t(h) * size_t(w);
        if (out_capacity < needed)
            fail(TADSR_ERR_ARGUMENT, "output buffer holds " + std::to_string(out_capacity) + " floats, needs " +
                                         std::to_string(needed));
        std::vector<float> tmp(needed);
        noise_window(seed, channels, h, w, y0, x0, tmp.data());
        std::copy(tmp.begin(), tmp.end(), out);
    });
}

const char* tadsr_last_error(void) { return g_last_error.c_str(); }

const char* tadsr_version(void) { return "0.1.0"; }

}  // extern "C"
