// tadsr-cpp: command-line front end of the tadsr C API.
//
//   tadsr-cpp upscale IN OUT --artifact DIR [--seed N] [--overlap N] [--blend feather|average] [--repeat N]
//                            [--stats]
//   tadsr-cpp noise OUT.f32 --seed N --shape C H W [--origin Y X]
//
// IN/OUT: .png (when built with stb) or binary .ppm (P6, 8-bit). OUT is written to a temporary name next to
// it and renamed when complete; on any error nothing is written. --repeat runs the upscale N times (timing);
// --stats prints one JSON line (load and per-run seconds, tiles, peak RSS) on stdout.
// Exit status: 0 ok, 2 bad usage or input, 1 any other failure; errors go to stderr as "error: <message>".
#include <sys/resource.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tadsr/tadsr.h"

#ifdef TADSR_HAVE_STB
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_FAILURE_USERMSG
#include <stb_image.h>
#include <stb_image_write.h>
#endif

namespace {

struct Image {
    int width = 0, height = 0;
    std::vector<uint8_t> rgb;
};

bool ends_with(const std::string& s, const std::string& suffix) {
    if (s.size() < suffix.size()) return false;
    std::string tail = s.substr(s.size() - suffix.size());
    for (auto& c : tail) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return tail == suffix;
}

int die(int code, const std::string& msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    return code;
}

// binary PPM (P6, maxval 255); comments allowed in the header
bool read_ppm(const std::string& path, Image* img, std::string* err) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) {
        *err = "cannot read image " + path + ": " + std::strerror(errno);
        return false;
    }
    auto token = [&](long* out) -> bool {
        int c = std::fgetc(f);
        while (c == '#' || (c != EOF && std::isspace(c))) {
            if (c == '#')
                while (c != '\n' && c != EOF) c = std::fgetc(f);
            c = std::fgetc(f);
        }
        if (c == EOF || !std::isdigit(c)) return false;
        long v = 0;
        while (c != EOF && std::isdigit(c)) {
            v = v * 10 + (c - '0');
            if (v > 1L << 24) return false;
            c = std::fgetc(f);
        }
        *out = v;
        return c != EOF && std::isspace(c);
    };
    char magic[2] = {0, 0};
    long w = 0, h = 0, maxval = 0;
    bool ok = std::fread(magic, 1, 2, f) == 2 && magic[0] == 'P' && magic[1] == '6' && token(&w) && token(&h) &&
              token(&maxval) && maxval == 255;
    if (ok) {
        img->width = static_cast<int>(w);
        img->height = static_cast<int>(h);
        img->rgb.resize(size_t(w) * size_t(h) * 3);
        ok = std::fread(img->rgb.data(), 1, img->rgb.size(), f) == img->rgb.size();
    }
    std::fclose(f);
    if (!ok) *err = "cannot read image " + path + ": not an 8-bit binary PPM (P6) or truncated";
    return ok;
}

bool read_image(const std::string& path, Image* img, std::string* err) {
    if (ends_with(path, ".ppm")) return read_ppm(path, img, err);
#ifdef TADSR_HAVE_STB
    int w = 0, h = 0, n = 0;
    unsigned char* data = stbi_load(path.c_str(), &w, &h, &n, 3);
    if (!data) {
        *err = "cannot read image " + path + ": " + stbi_failure_reason();
        return false;
    }
    img->width = w;
    img->height = h;
    img->rgb.assign(data, data + size_t(w) * size_t(h) * 3);
    stbi_image_free(data);
    return true;
#else
    *err = "cannot read " + path + ": this tadsr-cpp was built without PNG support (stb); use .ppm";
    return false;
#endif
}

// write to OUT.tmp-<pid> next to OUT, then rename over OUT
bool write_image(const std::string& path, const Image& img, std::string* err) {
    const std::string tmp = path + ".tmp-" + std::to_string(static_cast<long>(getpid()));
    bool ok = false;
    if (ends_with(path, ".ppm")) {
        FILE* f = std::fopen(tmp.c_str(), "wb");
        if (f) {
            ok = std::fprintf(f, "P6\n%d %d\n255\n", img.width, img.height) > 0 &&
                 std::fwrite(img.rgb.data(), 1, img.rgb.size(), f) == img.rgb.size();
            ok = (std::fclose(f) == 0) && ok;
        }
    } else if (ends_with(path, ".png")) {
#ifdef TADSR_HAVE_STB
        ok = stbi_write_png(tmp.c_str(), img.width, img.height, 3, img.rgb.data(), img.width * 3) != 0;
#else
        *err = "cannot write " + path + ": this tadsr-cpp was built without PNG support (stb); use .ppm";
        return false;
#endif
    } else {
        *err = "cannot write " + path + ": the output must end in .png or .ppm";
        return false;
    }
    if (ok && std::rename(tmp.c_str(), path.c_str()) == 0) return true;
    *err = "cannot write " + path + ": " + std::strerror(errno);
    std::remove(tmp.c_str());
    return false;
}

bool parse_u64(const char* s, uint64_t* out) {
    if (!s || !*s || *s == '-') return false;
    char* end = nullptr;
    errno = 0;
    unsigned long long v = std::strtoull(s, &end, 10);
    if (errno || *end) return false;
    *out = v;
    return true;
}

bool parse_int(const char* s, int* out) {
    uint64_t v;
    if (!parse_u64(s, &v) || v > (1u << 30)) return false;
    *out = static_cast<int>(v);
    return true;
}

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int usage() {
    std::fprintf(stderr,
                 "usage: tadsr-cpp upscale IN OUT --artifact DIR [--seed N] [--overlap N] "
                 "[--blend feather|average] [--repeat N] [--stats]\n"
                 "       tadsr-cpp noise OUT.f32 --seed N --shape C H W [--origin Y X]\n"
                 "IN/OUT: .ppm%s\n",
#ifdef TADSR_HAVE_STB
                 " or .png"
#else
                 " (built without PNG support)"
#endif
    );
    return 2;
}

int cmd_noise(int argc, char** argv) {
    if (argc < 3) return usage();
    const std::string out = argv[2];
    uint64_t seed = 0;
    int c = -1, h = -1, w = -1, y0 = 0, x0 = 0;
    for (int i = 3; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--seed" && i + 1 < argc) {
            if (!parse_u64(argv[++i], &seed)) return die(2, "--seed must be an integer in [0, 2^64)");
        } else if (a == "--shape" && i + 3 < argc) {
            if (!parse_int(argv[i + 1], &c) || !parse_int(argv[i + 2], &h) || !parse_int(argv[i + 3], &w))
                return die(2, "--shape takes three non-negative integers C H W");
            i += 3;
        } else if (a == "--origin" && i + 2 < argc) {
            if (!parse_int(argv[i + 1], &y0) || !parse_int(argv[i + 2], &x0))
                return die(2, "--origin takes two non-negative integers Y X");
            i += 2;
        } else {
            return usage();
        }
    }
    if (c < 0) return die(2, "--shape C H W is required");
    std::vector<float> buf(size_t(c) * h * w);
    if (tadsr_noise(seed, c, h, w, uint32_t(y0), uint32_t(x0), buf.data(), buf.size()) != TADSR_OK)
        return die(2, tadsr_last_error());
    FILE* f = std::fopen(out.c_str(), "wb");
    if (!f || std::fwrite(buf.data(), sizeof(float), buf.size(), f) != buf.size() || std::fclose(f) != 0)
        return die(1, "cannot write " + out);
    return 0;
}

int cmd_upscale(int argc, char** argv) {
    if (argc < 4) return usage();
    const std::string in = argv[2], out = argv[3];
    std::string artifact;
    uint64_t seed = 0;
    int repeat = 1;
    bool stats = false;
    tadsr_options opts;
    tadsr_options_default(&opts);
    for (int i = 4; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--artifact" && i + 1 < argc) {
            artifact = argv[++i];
        } else if (a == "--seed" && i + 1 < argc) {
            if (!parse_u64(argv[++i], &seed)) return die(2, "--seed must be an integer in [0, 2^64)");
        } else if (a == "--overlap" && i + 1 < argc) {
            if (!parse_int(argv[++i], &opts.overlap)) return die(2, "--overlap must be a non-negative integer");
        } else if (a == "--blend" && i + 1 < argc) {
            const std::string b = argv[++i];
            if (b != "feather" && b != "average") return die(2, "--blend must be feather or average");
            opts.blend = b == "average";
        } else if (a == "--repeat" && i + 1 < argc) {
            if (!parse_int(argv[++i], &repeat) || repeat < 1) return die(2, "--repeat must be >= 1");
        } else if (a == "--stats") {
            stats = true;
        } else {
            return usage();
        }
    }
    if (artifact.empty()) return die(2, "--artifact DIR is required");
    if (!ends_with(out, ".png") && !ends_with(out, ".ppm"))
        return die(2, "the output " + out + " must end in .png or .ppm");
    std::string err;
    Image src;
    if (!read_image(in, &src, &err)) return die(2, err);

    const double t0 = now();
    tadsr_runner* runner = nullptr;
    tadsr_status st = tadsr_runner_create(artifact.c_str(), &opts, &runner);
    if (st != TADSR_OK) return die(st == TADSR_ERR_RUNTIME ? 1 : 2, tadsr_last_error());
    const double load_s = now() - t0;
    const int scale = tadsr_runner_scale(runner);
    Image dst;
    dst.width = src.width * scale;
    dst.height = src.height * scale;
    dst.rgb.resize(size_t(dst.width) * dst.height * 3);
    std::vector<double> runs;
    for (int k = 0; k < repeat && st == TADSR_OK; ++k) {
        const double t1 = now();
        st = tadsr_upscale_rgb8(runner, src.rgb.data(), src.width, src.height, seed, dst.rgb.data(), dst.rgb.size());
        runs.push_back(now() - t1);
    }
    const bool fused = tadsr_runner_fused(runner) != 0;
    const int tile = tadsr_runner_tile(runner);
    const std::string precision = tadsr_runner_precision(runner);
    tadsr_runner_free(runner);
    if (st != TADSR_OK) return die(st == TADSR_ERR_ARGUMENT ? 2 : 1, tadsr_last_error());
    if (!write_image(out, dst, &err)) return die(2, err);
    if (stats) {
        struct rusage ru {};
        getrusage(RUSAGE_SELF, &ru);
        std::printf("{\"load_s\": %.6f, \"runs_s\": [", load_s);
        for (size_t k = 0; k < runs.size(); ++k) std::printf("%s%.6f", k ? ", " : "", runs[k]);
        std::printf("], \"peak_rss_mb\": %.1f, \"fused\": %s, \"tile\": %d, \"scale\": %d, \"precision\": \"%s\"}\n",
                    ru.ru_maxrss / 1024.0, fused ? "true" : "false", tile, scale, precision.c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    const std::string cmd = argv[1];
    if (cmd == "upscale") return cmd_upscale(argc, argv);
    if (cmd == "noise") return cmd_noise(argc, argv);
    if (cmd == "--version") {
        std::printf("tadsr-cpp %s%s\n", tadsr_version(),
#ifdef TADSR_HAVE_STB
                    " (png, ppm)"
#else
                    " (ppm)"
#endif
        );
        return 0;
    }
    return usage();
}
